"""Samplers on hand-built distributions, and the text assembler on hand-built byte splits."""

from __future__ import annotations

import numpy as np
import pytest

from minimind_core import sampling
from minimind_core.params import SamplingParams
from minimind_core.textstream import TextAssembler

LOGITS = np.log(np.array([[0.5, 0.25, 0.15, 0.10]], dtype=np.float32))


def kept(logits):
    return np.isfinite(logits[0]).nonzero()[0].tolist()


def test_top_k_keeps_k_best():
    assert kept(sampling.top_k(LOGITS, 2)) == [0, 1]
    assert kept(sampling.top_k(LOGITS, 0)) == [0, 1, 2, 3]


@pytest.mark.parametrize("p,expected", [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]),
                                        (0.76, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_smallest_set_reaching_mass(p, expected):
    assert kept(sampling.top_p(LOGITS, p)) == expected


def test_min_p_relative_to_top():
    assert kept(sampling.min_p(LOGITS, 0.4)) == [0, 1]  # 0.25 >= 0.2, 0.15 < 0.2
    assert kept(sampling.min_p(LOGITS, 0.51)) == [0]  # 0.25 < 0.255


def test_repetition_penalty_transformers_convention():
    logits = np.array([[2.0, -2.0, 1.0]], dtype=np.float32)
    out = sampling.repetition_penalty(logits, [[0, 1, 1]], 2.0, None)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0]])
    # only the recent context counts
    out = sampling.repetition_penalty(logits, [[0, 1, 1]], 2.0, 1)
    np.testing.assert_allclose(out, [[2.0, -4.0, 1.0]])


def test_sampling_frequencies_follow_probabilities():
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0)
    draws = [int(sampling.sample(LOGITS, params, [[]], rng)[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.10], atol=0.03)


def test_low_temperature_sharpens_and_greedy_is_argmax():
    rng = np.random.default_rng(0)
    draws = [int(sampling.sample(LOGITS, SamplingParams(temperature=0.05), [[]], rng)[0])
             for _ in range(200)]
    assert set(draws) == {0}
    assert sampling.sample(LOGITS[:, ::-1], SamplingParams(), [[]], rng).tolist() == [3]


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = [sampling.sample(LOGITS, params, [[]], np.random.default_rng(7))[0] for _ in range(5)]
    b = [sampling.sample(LOGITS, params, [[]], np.random.default_rng(7))[0] for _ in range(5)]
    assert a == b


@pytest.mark.parametrize("bad,match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"min_p": 1.0}, "min_p"), ({"repetition_penalty": 0}, "repetition"),
    ({"max_new_tokens": -3}, "max_new_tokens"), ({"stop": [""]}, "stop")])
def test_bad_sampling_params(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_unknown_sampling_kwarg():
    with pytest.raises(ValueError, match="unknown sampling parameter 'temprature'"):
        SamplingParams.from_kwargs(temprature=0.5)
    assert SamplingParams.from_kwargs(max_tokens=7, top_p=None).max_new_tokens == 7


class ByteTokenizer:
    """Each id is one UTF-8 byte: a Chinese character spans three tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(asm, text):
    return [asm.add(b) for b in text.encode("utf-8")]


def test_split_characters_are_never_emitted_half_done():
    asm = TextAssembler(ByteTokenizer())
    deltas = feed(asm, "你好ab")
    assert deltas == ["", "", "你", "", "", "好", "a", "b"]
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_not_returned_and_held_back_until_decided():
    asm = TextAssembler(ByteTokenizer(), stop=("END",))
    deltas = feed(asm, "abEN")
    assert "".join(deltas) == "ab"  # "EN" may still become END
    deltas = feed(asm, "Dxyz")
    assert asm.stopped and "".join(deltas) == ""
    assert asm.final_text == "ab"


def test_partial_stop_released_when_it_diverges_and_at_finish():
    asm = TextAssembler(ByteTokenizer(), stop=("END",))
    assert "".join(feed(asm, "aEx")) == "aEx"
    assert "".join(feed(asm, "EN")) == ""
    assert asm.finish() == "EN"


def test_earliest_of_several_stops_wins():
    asm = TextAssembler(ByteTokenizer(), stop=("cd", "b"))
    assert "".join(feed(asm, "abcd")) == "a"
    assert asm.final_text == "a"


def test_sampling_params_types():
    with pytest.raises(ValueError, match="temperature must be a number, got '0.5'"):
        SamplingParams(temperature="0.5")
    with pytest.raises(ValueError, match="top_p must be a number"):
        SamplingParams(top_p=None)
