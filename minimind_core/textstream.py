"""Turn a growing list of token ids into safe text deltas, and find stop strings.

Byte-level BPE splits one Chinese character over several tokens; decoding a prefix then ends in
U+FFFD. Text is only released once it decodes cleanly, and any tail that could still become a
stop string is held back until it cannot.

Stop strings are matched incrementally: each new character advances one small Knuth–Morris–
Pratt automaton per stop string that has started to match (an index by the first two
characters finds the ones that start), so a token costs work in proportion to its own
characters and the matches in progress, never a rescan of every stop string: 2,000 stop
strings of 1 KB cost about as much as a few.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class _StopMatcher:
    """KMP state for one stop string: ``state`` is the length of the longest prefix of the
    string that the text read so far ends with. The failure table is built lazily, only as far
    as the state has reached, so a long stop string that never gets far costs nothing."""

    __slots__ = ("fail", "state", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.fail = [0]  # fail[i]: longest proper border of text[:i + 1]
        self.state = 0

    def _extend_fail(self, upto: int) -> None:
        s, fail = self.text, self.fail
        k = fail[-1]
        for j in range(len(fail), upto + 1):
            while k and s[j] != s[k]:
                k = fail[k - 1]
            if s[j] == s[k]:
                k += 1
            fail.append(k)

    def begin(self) -> None:
        """The text now ends with the string's first two characters."""
        if len(self.fail) < 2:
            self._extend_fail(1)
        self.state = 2

    def step(self, c: str) -> bool:
        """Read one character; True when the whole stop string has just been read."""
        s, k = self.text, self.state
        while k and s[k] != c:
            k = self.fail[k - 1]
        if s[k] == c:
            k += 1
        if k == len(s):
            self.state = 0
            return True
        if k > len(self.fail):
            self._extend_fail(k - 1)
        self.state = k
        return False


class _StopScanner:
    """Every stop string's matcher, fed the text one character at a time.

    A matcher runs only while its state is 2 or more; it is started (made, the first time)
    when the text ends with its string's first two characters. Below that its state is implied
    by the last character read, which is all ``partial`` needs. One-character stop strings are
    a set lookup.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        unique = dict.fromkeys(stops)  # duplicates would only repeat the work
        self.singles = {s for s in unique if len(s) == 1}
        self.starts = {s[0] for s in unique if len(s) > 1}
        self.by_pair: dict[str, list[str]] = {}
        for s in unique:
            if len(s) > 1:
                self.by_pair.setdefault(s[:2], []).append(s)
        self.matchers: dict[str, _StopMatcher] = {}
        self.active: list[_StopMatcher] = []  # matchers with state >= 2
        self.last = ""  # the last character read

    def feed(self, text: str, offset: int) -> int | None:
        """Read ``text`` (which starts at position ``offset`` of the whole text); return where
        the earliest-starting stop string completed in it begins, or None."""
        hit: int | None = None
        done: set[str] = set()  # stop strings that completed: the text is cut there anyway
        prev = self.last
        for pos, c in enumerate(text, offset):
            if c in self.singles:
                hit = _earlier(hit, pos)
            still = []
            for m in self.active:
                if m.step(c):
                    hit = _earlier(hit, pos + 1 - len(m.text))
                    done.add(m.text)
                elif m.state >= 2:
                    still.append(m)
                else:
                    m.state = 0  # 1 or 0: implied by the last character from now on
            for s in self.by_pair.get(prev + c, ()):
                m = self.matchers.get(s)
                if m is None:
                    m = self.matchers[s] = _StopMatcher(s)
                elif m.state or s in done:  # running (stepped above), or finished
                    continue
                if len(s) == 2:
                    hit = _earlier(hit, pos - 1)
                    done.add(s)
                else:
                    m.begin()
                    still.append(m)
            self.active = still
            prev = c
        self.last = prev
        return hit

    @property
    def partial(self) -> int:
        """Length of the longest tail of the text read that is a proper prefix of a stop."""
        best = max((m.state for m in self.active), default=0)
        return best or int(self.last in self.starts)


def _earlier(a: int | None, b: int) -> int:
    return b if a is None or b < a else a


class TextAssembler:
    """Incremental detokenizer with stop-string handling for one sequence."""

    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (before stop truncation)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix, self._read = 0, 0  # ids[prefix:read] is the already-decoded context window
        self._scanner = _StopScanner(tuple(stop)) if stop else None
        self._scanned = 0  # characters of self.text the stop scanner has read

    def add(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (held-back tails included)."""
        if self.stopped:  # the text ends at the stop string, whatever came after it
            return ""
        if self._read < len(self.ids):  # undecodable bytes at the very end: show what they are
            prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(prefix_text):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self._scanner is not None:
            hit = self._scanner.feed(self.text[self._scanned:], self._scanned)
            self._scanned = len(self.text)
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
                end = hit
            elif not final:
                end -= self._scanner.partial
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    @property
    def final_text(self) -> str:
        return self.text
