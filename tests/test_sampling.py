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


def draws(logits, params, n, seed=0, history=()):
    """Draws 0..n-1 of one seeded row (the token loop's step counter)."""
    return [int(sampling.sample(logits, params, [list(history)], [seed], [step])[0])
            for step in range(n)]


def test_sampling_frequencies_follow_probabilities():
    got = draws(LOGITS, SamplingParams(temperature=1.0), 4000)
    freq = np.bincount(got, minlength=4) / len(got)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.10], atol=0.03)


def test_low_temperature_sharpens_and_greedy_is_argmax():
    assert set(draws(LOGITS, SamplingParams(temperature=0.05), 200)) == {0}
    assert sampling.sample(LOGITS[:, ::-1], SamplingParams(), [[]], [0], [0]).tolist() == [3]


def test_same_seed_and_step_same_draw_whatever_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = draws(LOGITS, params, 20, seed=7)
    assert a == draws(LOGITS, params, 20, seed=7)
    assert a != draws(LOGITS, params, 20, seed=8)
    # row 1 of a batch with other rows, other seeds and other steps draws what it draws alone
    rows = np.repeat(LOGITS, 3, axis=0)
    for step in range(20):
        got = sampling.sample(rows, params, [[]] * 3, [1, 7, 9], [5, step, 0])
        assert got[1] == a[step]


def test_uniform_is_the_documented_splitmix_formula():
    """u = (mix(mix(seed ^ salt) + (step + 1) * golden) >> 11) / 2**53, computed here with
    Python's unbounded ints and an explicit mod 2**64 (an independent implementation)."""
    m = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    seeds = [0, 1, 2**63 - 1, -1, 12345678901234]
    steps = [0, 1, 31, 10**6, 3]
    want = [(mix((mix((s % (1 << 64)) ^ 0x6A09E667F3BCC909) + (t + 1) * 0x9E3779B97F4A7C15) & m)
             >> 11) / 2**53 for s, t in zip(seeds, steps)]
    np.testing.assert_array_equal(sampling.uniform(seeds, steps), want)
    u = sampling.uniform([3] * 20000, range(20000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_draw_is_the_inverse_cdf():
    # cdf 0.5, 0.75, 0.9, 1.0: u in [0, .5) -> 0, [.5, .75) -> 1, [.75, .9) -> 2, else 3
    logits = np.repeat(LOGITS, 6, axis=0)
    u = np.array([0.0, 0.49, 0.51, 0.74, 0.76, 0.95])
    assert sampling.draw(logits, u).tolist() == [0, 0, 1, 1, 2, 3]


def test_filter_order_penalty_then_temperature_then_top_k_top_p_min_p():
    # the penalty acts on raw logits (before temperature): token 0 (2.0 -> 1.0) drops below 1
    logits = np.array([[2.0, 1.5, 0.0, -1.0]], dtype=np.float32)
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0)
    penalised = sampling.repetition_penalty(logits, [[0]], 2.0, None)
    np.testing.assert_allclose(penalised, [[1.0, 1.5, 0.0, -1.0]])
    kept_ids = kept(sampling.filter_logits(penalised, params))
    assert kept_ids == [0, 1]
    np.testing.assert_allclose(sampling.filter_logits(penalised, params)[0, :2], [2.0, 3.0])
    # top-p after top-k: of the two kept (probs ~.27/.73 at T=.5) 0.7 keeps only token 1
    narrow = SamplingParams(temperature=0.5, top_k=2, top_p=0.7, repetition_penalty=2.0)
    assert kept(sampling.filter_logits(penalised, narrow)) == [1]
    assert set(draws(logits, narrow, 50, history=[0])) == {1}


def test_rows_with_different_parameters_in_one_call():
    rows = np.repeat(LOGITS, 2, axis=0)
    greedy, hot = SamplingParams(), SamplingParams(temperature=1.0, top_k=1)
    assert sampling.sample(rows[:, ::-1], [greedy, hot], [[], []], [0, 0], [0, 0]).tolist() == [3, 3]


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
