"""The speed path: static-shape decode (eager, compiled, CUDA graph) equals plain decoding, and
device-side sampling applies the same filters as the numpy samplers."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch import sampling as dsampling  # noqa: E402
from backends.torch.static import batch_bucket  # noqa: E402
from minimind_core import load, sampling  # noqa: E402
from minimind_core.params import SamplingParams  # noqa: E402

PROMPTS = [[1, 5, 9], list(range(3, 40)), [1, 200, 300, 40], [7] * 11, [9, 8, 7, 6, 5]]
CUDA = torch.cuda.is_available()


def static_engine(path, mode, **kw):
    engine = load(path, backend="torch", **kw)
    engine.static = mode
    return engine


@pytest.mark.parametrize("kind", ["minimind2", "minimind2-moe", "minimind3", "minimind3-moe"])
def test_static_step_equals_plain_decode(kind, make_checkpoint):
    path, _, _ = make_checkpoint(kind)
    plain = load(path, backend="torch", device="cpu")
    static = static_engine(path, "eager", device="cpu")
    got = static.generate_batch(PROMPTS, max_new_tokens=20)
    want = plain.generate_batch(PROMPTS, max_new_tokens=20)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert static.cache.batch == batch_bucket(len(PROMPTS)) == 8  # padded to the bucket
    one = static.generate(PROMPTS[1], max_new_tokens=20)
    assert one.token_ids == want[1].token_ids


def test_static_path_used_only_where_it_can_be(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    engine = static_engine(path, "eager", device="cpu")
    from backends.torch.static import static_steps

    assert engine._steps([[1, 2]], SamplingParams()).__name__ == static_steps.__name__
    # repetition penalty needs the history: host sampling path
    steps = engine._steps([[1, 2]], SamplingParams(repetition_penalty=1.2))
    assert steps.__name__ == "_steps"
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        type(engine)(engine.model, engine.tokenizer, static="graph")


@pytest.mark.skipif(os.environ.get("MINIMIND_SKIP_COMPILE") == "1", reason="compile tests off")
def test_compiled_step_equals_plain_decode_on_cpu(make_checkpoint):
    """torch.compile (inductor, CPU) of the static step gives the same greedy tokens."""
    path, _, _ = make_checkpoint("minimind3", num_hidden_layers=1)
    plain = load(path, backend="torch", device="cpu")
    compiled = load(path, backend="torch", device="cpu", compile=True)
    assert compiled.info["decode"] == "compile"
    prompts = PROMPTS[:2]
    got = compiled.generate_batch(prompts, max_new_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in
                                          plain.generate_batch(prompts, max_new_tokens=12)]


LOGITS = np.log(np.array([[0.5, 0.25, 0.15, 0.10, 0.0001]], dtype=np.float32))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=1.0, top_p=0.76), SamplingParams(temperature=1.0, min_p=0.4),
    SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05)])
def test_device_filters_equal_numpy_filters(params):
    t = torch.from_numpy(LOGITS)
    got = dsampling.filter_logits(t, params).numpy()
    x = LOGITS / np.float32(params.temperature)
    want = sampling.min_p(sampling.top_p(sampling.top_k(x, params.top_k), params.top_p),
                          params.min_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_exponential_race_draws_follow_probabilities():
    gen = torch.Generator().manual_seed(0)
    logits = torch.from_numpy(np.repeat(LOGITS, 4000, axis=0))
    draws = dsampling.sample(logits, SamplingParams(temperature=1.0), gen).numpy()
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq[:4], [0.5, 0.25, 0.15, 0.10], atol=0.03)
    assert dsampling.sample(logits[:2], SamplingParams()).tolist() == [0, 0]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["minimind2", "minimind3-moe"])
def test_cuda_graph_decode_equals_eager(kind, make_checkpoint):
    path, _, _ = make_checkpoint(kind)
    graph = load(path, backend="torch", device="cuda", dtype="float32")
    assert graph.info["decode"] == "graph"
    eager = load(path, backend="torch", device="cuda", dtype="float32", cuda_graphs=False)
    got = graph.generate_batch(PROMPTS, max_new_tokens=40)
    want = eager.generate_batch(PROMPTS, max_new_tokens=40)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for prompt, row in zip(PROMPTS, got):
        assert graph.generate(prompt, max_new_tokens=40).token_ids == row.token_ids


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [("float16", 0.05), ("bfloat16", 0.15)])
def test_cuda_half_precision_close_to_fp32(dtype, tol, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")
    ref = load(path, backend="torch", device="cpu", dtype="float32").logits(PROMPTS[1])
    got = load(path, backend="torch", device="cuda", dtype=dtype).logits(PROMPTS[1])
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())


def test_static_path_stops_at_the_end_of_a_window_sized_cache(make_checkpoint):
    """Blocks of several steps must not run past a cache clamped to the context window."""
    path, _, _ = make_checkpoint("minimind2", max_position_embeddings=64)
    plain = load(path, backend="torch", device="cpu", max_position_embeddings=64)
    static = static_engine(path, "eager", device="cpu", max_position_embeddings=64)
    static.sync_every = 8
    from backends.torch.static import static_steps

    prompt = list(range(3, 49))  # 46 tokens: 18 left, so the third block of 8 must stop early
    want = plain.generate(prompt, max_new_tokens=100)
    static._steps = lambda rows, params: static_steps(static, rows, params, "eager", 8)
    got = static.generate(prompt, max_new_tokens=100)
    assert got.token_ids == want.token_ids and want.completion_tokens == 18
