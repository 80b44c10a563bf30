"""Turn a growing list of token ids into safe text deltas, and find stop strings.

Byte-level BPE splits one Chinese character over several tokens; decoding a prefix then ends in
U+FFFD. Text is only released once it decodes cleanly, and any tail that could still become a
stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class TextAssembler:
    """Incremental detokenizer with stop-string handling for one sequence."""

    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far (before stop truncation)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix, self._read = 0, 0  # ids[prefix:read] is the already-decoded context window

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
        if self._read < len(self.ids):  # undecodable bytes at the very end: show what they are
            prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(prefix_text):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
                end = hit
            elif not final:
                end -= self._partial_stop_len()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _find_stop(self) -> int | None:
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    @property
    def final_text(self) -> str:
        return self.text
