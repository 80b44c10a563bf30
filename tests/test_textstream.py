"""The incremental stop-string scanner against a brute-force oracle written from the definition.

The oracle is the rule in its plainest form: after each token, the text is cut at the earliest
start of any stop string present in it; otherwise everything is shown except the longest tail
that is a proper prefix of some stop string. Random texts and stop strings over a small
alphabet (so that stop strings overlap, repeat and half-match a lot) must give the same deltas.
"""

from __future__ import annotations

import pytest

from minimind_core.textstream import TextAssembler

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


class CharTokenizer:
    """Token id i is the character chr(i): one token, one character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def oracle(tokens: list[str], stops: tuple[str, ...]) -> tuple[list[str], str]:
    """(deltas after each token + the finish delta, final text), by brute force."""
    text, emitted, deltas = "", 0, []
    for i, piece in enumerate([*tokens, None]):
        final = piece is None
        if not final:
            text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            cut = min(hits)
            deltas.append(text[emitted:cut])
            rest = len(tokens) - i  # the later tokens and the finish give nothing
            return deltas + [""] * rest, text[:cut]
        hold = 0 if final else max((n for s in stops for n in range(1, len(s))
                                    if text.endswith(s[:n])), default=0)
        deltas.append(text[emitted:len(text) - hold])
        emitted = max(emitted, len(text) - hold)
    return deltas, text


def run(tokens: list[str], stops: tuple[str, ...]) -> tuple[list[str], str]:
    asm = TextAssembler(CharTokenizer(), stop=stops)
    deltas = []
    for piece in tokens:  # a "token" of several characters: one id per character, then a delta
        out = ""
        for c in piece[:-1]:
            asm.ids.append(ord(c))
        out += asm.add(ord(piece[-1]))
        deltas.append(out)
    deltas.append(asm.finish())
    return deltas, asm.final_text


def test_hand_example_overlapping_stops():
    # "abab" then "c": the stop "ababc" needs KMP's fallback (a naive restart would miss it)
    assert run(["ab", "ab", "abc", "x"], ("ababc",)) == (["", "", "ab", "", ""], "ab")
    assert oracle(["ab", "ab", "abc", "x"], ("ababc",)) == (["", "", "ab", "", ""], "ab")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    tokens=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=12),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=4))
def test_matches_the_brute_force_oracle(tokens, stops):
    assert run(tokens, tuple(stops)) == oracle(tokens, tuple(stops))


def test_thousands_of_long_stop_strings_give_the_same_text():
    """2,000 stop strings of 1,000 characters (one of which occurs) stop exactly where the
    oracle says, reading the text once."""
    import random
    import string

    rng = random.Random(0)
    letters = string.ascii_letters + string.digits
    stops = tuple("".join(rng.choices(letters, k=1000)) for _ in range(2000))
    body = "".join(rng.choices(letters, k=3000))
    text = body + stops[1234] + "tail"
    tokens = [text[i:i + 3] for i in range(0, len(text), 3)]
    deltas, final = run(tokens, stops)
    cut = min(text.find(s) for s in stops if s in text)  # another stop may occur by chance
    assert final == text[:cut] and "".join(deltas) == text[:cut]
