"""The decode core: one token loop over a slot cache, interchangeable decode steps, one sampler
seeded per row. A request's tokens do not depend on how it runs: alone, streamed, as any row of a
batch, joining a running batch, or through any ``decode=`` implementation."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_torch_parity import hf_greedy, hf_model  # noqa: E402

from backends.torch import native  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.engine import TokenLoop  # noqa: E402
from minimind_core.params import SamplingParams  # noqa: E402

SAMPLED = dict(temperature=0.9, top_p=0.9, top_k=50)
SEEDS = (0, 1, 7, 2**40 + 3)
N = 32
COMPILE = os.environ.get("MINIMIND_SKIP_COMPILE") != "1"
DECODES = ["eager"] + (["native"] if native.library() is not None else []) + (
    ["compiled"] if COMPILE else [])


def both_backends(path):
    """(name, engine) for torch, then MLX where it is installed (float32 on the CPU)."""
    yield "torch", load(path, backend="torch", device="cpu", dtype="float32")
    if importlib.util.find_spec("mlx") is not None:
        yield "mlx", load(path, backend="mlx", device="cpu", dtype="float32")


def prompt_pair(engine) -> tuple[list[int], list[int]]:
    p = engine.encode("hello world, 你好")
    return p, p + p


@pytest.fixture(scope="module", params=["minimind2", "minimind3"])
def model(request, tmp_path_factory, tokenizer_dir):
    """A checkpoint of each generation (path, config, weights)."""
    from conftest import write_checkpoint

    # one layer: torch.compile is slow
    return write_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_dir, request.param,
                            11, num_hidden_layers=1)


def tokens_of(engine, how: str, prompt, pair, seed, params) -> list[int]:
    if how == "generate":
        return engine.generate(prompt, seed=seed, **params).token_ids
    if how == "stream":
        chunks = list(engine.stream(prompt, seed=seed, **params))
        return chunks[-1].token_ids
    row = pair.index(prompt)
    return engine.generate_batch(pair, seed=seed, **params)[row].token_ids


def test_same_tokens_alone_streamed_batched_and_on_every_decode_step(model):
    path, config, weights = model
    solo: dict = {}
    for decode in DECODES:
        engine = load(path, backend="torch", device="cpu", decode=decode)
        assert engine.describe()["decode"] == decode
        p, pp = prompt_pair(engine)
        engine.generate_batch([p, pp], max_new_tokens=1)  # one cache (one compile) for all runs
        for seed in SEEDS:
            for prompt in (p, pp):
                params = dict(max_new_tokens=N, **SAMPLED)
                want = solo.setdefault((seed, len(prompt)), engine.generate(
                    prompt, seed=seed, **params).token_ids)
                assert len(want) == N  # eos is unlikely from random weights; the test needs N
                for how in ("generate", "stream", "batch"):
                    got = tokens_of(engine, how, prompt, [p, pp], seed, params)
                    assert got == want, (decode, how, seed, len(prompt))
        # greedy equals the reference implementation's (transformers' Llama / Qwen3)
        ref = hf_model(config, weights)
        for prompt in (p, pp):
            greedy = engine.generate_batch([p, pp], max_new_tokens=16, stop=())[
                [p, pp].index(prompt)]
            want = hf_greedy(ref, prompt, 16)
            assert greedy.token_ids == want[:len(greedy.token_ids)]


def test_seed_list_gives_each_row_its_own_seed(model):
    path, _, _ = model
    engine = load(path, backend="torch", device="cpu")
    p, _ = prompt_pair(engine)
    rows = engine.generate_batch([p, p, p], seed=[3, 4, 3], max_new_tokens=16, **SAMPLED)
    alone = [engine.generate(p, seed=s, max_new_tokens=16, **SAMPLED).token_ids for s in (3, 4)]
    assert [r.token_ids for r in rows] == [alone[0], alone[1], alone[0]]
    assert alone[0] != alone[1]  # a seed matters
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate_batch([p, p], seed=[1, 2, 3])


def test_rows_join_and_leave_a_running_batch(model):
    """Between two decode steps a row is prefilled into the batch and another freed; every row's
    tokens equal its solo run (the core continuous batching stands on)."""
    path, _, _ = model
    for decode in DECODES[:2]:
        engine = load(path, backend="torch", device="cpu", decode=decode)
        p, pp = prompt_pair(engine)
        params = SamplingParams(max_new_tokens=24, **SAMPLED)
        prompts = {"a": (p, 5), "b": (pp, 6), "c": (p[:3], 9)}
        solo = {k: [int(t[0]) for t in engine.iter_tokens([ids], params, seed=s)]
                for k, (ids, s) in prompts.items()}  # no stop at eos, as the loop below
        got: dict[str, list[int]] = {k: [] for k in prompts}
        with engine.exclusive():
            loop = TokenLoop(engine, 3, 64)
            rows = {"a": loop.add(prompts["a"][0], params, 5)}
            for step in range(40):
                if step == 4:
                    rows["b"] = loop.add(prompts["b"][0], params, 6)  # joins mid-way
                if step == 10:
                    rows["c"] = loop.add(prompts["c"][0], params, 9)
                for row, token in loop.step():
                    name = next(k for k, r in rows.items() if r is row)
                    got[name].append(token)
                    if len(got[name]) == 24:
                        loop.remove(row)  # leaves; the others go on untouched
                if not loop.rows:
                    break
            loop.close()
        assert got == solo, decode
        assert not engine._cache.used.any()


def test_padding_rows_and_slot_order_do_not_change_a_row(model):
    """A row in slot 3 of a cache with a hole at slot 1 (a gathered, non-contiguous batch)."""
    path, _, _ = model
    engine = load(path, backend="torch", device="cpu", decode="eager")
    p, pp = prompt_pair(engine)
    params = SamplingParams(max_new_tokens=12, **SAMPLED)
    want = [int(t[0]) for t in engine.iter_tokens([pp], params, seed=1)]
    with engine.exclusive():
        loop = TokenLoop(engine, 4, 64)
        rows = [loop.add(ids, params, 2) for ids in (p, p, p)]
        loop.remove(rows[1])
        mine = loop.add(pp, params, 1)
        assert mine.slot == 1
        loop.remove(rows[0])
        got = []
        for _ in range(12):
            got += [t for r, t in loop.step() if r is mine]
        loop.close()
    assert got == want


def test_rope_tables_are_built_once(make_checkpoint):
    """Same storage after a generation past 4096 positions and after a batch, on every step."""
    path, _, _ = make_checkpoint("minimind3", num_hidden_layers=1)
    for decode in DECODES:
        engine = load(path, backend="torch", device="cpu", decode=decode,
                      max_position_embeddings=4200)
        table = engine.model.rope_cos
        ptr = table.data_ptr()
        assert table.shape[0] == 4200
        long = list(np.random.default_rng(0).integers(3, 300, 4090))
        r = engine.generate(long, max_new_tokens=20)
        assert r.completion_tokens == 20  # past position 4096
        engine.generate_batch([[1, 2, 3], [4, 5]], max_new_tokens=5)
        assert engine.model.rope_cos.data_ptr() == ptr and engine.model.rope_cos is table


def test_decode_choice_errors_and_deprecated_aliases(make_checkpoint, tmp_path):
    path, _, _ = make_checkpoint("minimind2")
    with pytest.raises(ValueError, match="auto, eager, native, compiled"):
        load(path, backend="torch", decode="fast")
    with pytest.raises(ValueError, match="decode='native' cannot run here.*CPU float32.*eager"):
        load(path, backend="torch", dtype="bfloat16", decode="native")
    for old, want in (({"native": False}, "eager"), ({"compile": True}, "compiled"),
                      ({"cuda_graphs": False}, "eager"), ({"static": "eager"}, "eager")):
        with pytest.warns(DeprecationWarning, match="decode="):
            engine = load(path, backend="torch", device="cpu", **old)
        assert engine.info["decode"] == want, old
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(path, backend="torch", device="cpu", decode="eager").info["decode"] == "eager"


def test_busy_guard_is_per_open_generation_not_per_thread_id(make_checkpoint):
    """A stream left open in a finished thread: a new thread (which may get the same id) waits
    for it like any other thread instead of being told it is the owner."""
    import threading

    from minimind_core.engine import EngineBusyError

    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch", device="cpu")
    box = {}

    def opener():
        box["stream"] = engine.stream([1, 2, 3], max_new_tokens=50)
        next(box["stream"])  # holds the engine, then the thread ends

    t = threading.Thread(target=opener)
    t.start()
    t.join()
    result = {}

    def other():
        result["r"] = engine.generate([1, 2], max_new_tokens=2)

    t2 = threading.Thread(target=other)
    t2.start()
    t2.join(0.5)
    assert t2.is_alive() and "r" not in result  # waiting, not failing
    box["stream"].close()  # the open generation ends: the waiter runs
    t2.join(30)
    assert result["r"].completion_tokens == 2
    # the thread whose own stream is open still gets the clear error
    s = engine.stream([1, 2, 3], max_new_tokens=50)
    next(s)
    with pytest.raises(EngineBusyError, match="unfinished stream"):
        engine.generate([1], max_new_tokens=1)
    s.close()


def test_mlx_runs_the_same_core_and_sampler(model):
    """MLX: rows of a batch and rows joining a running one equal their solo runs, and a seeded
    sampled generation gives the torch backend's tokens (one sampler, host-side, on both)."""
    pytest.importorskip("mlx.core")
    path, _, _ = model
    mlx = load(path, backend="mlx", device="cpu", dtype="float32")
    ref = load(path, backend="torch", device="cpu", decode="eager")
    p, pp = prompt_pair(mlx)
    params = SamplingParams(max_new_tokens=16, **SAMPLED)
    for seed in SEEDS[:2]:
        want = ref.generate_batch([p, pp], params, seed=seed)
        got = mlx.generate_batch([p, pp], params, seed=seed)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert mlx.generate(pp, params, seed=seed).token_ids == want[1].token_ids
    solo = [int(t[0]) for t in mlx.iter_tokens([pp], params, seed=4)]
    with mlx.exclusive():
        loop = TokenLoop(mlx, 2, 64)
        first = loop.add(p, params, 1)
        got = []
        for step in range(20):
            if step == 3:
                row = loop.add(pp, params, 4)
            got += [t for r, t in loop.step() if step >= 3 and r is row]
            if len(got) == 16:
                break
        loop.remove(first)
        loop.close()
    assert got == solo


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2),
    SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=0.7, min_p=0.2),
    SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.5),
    SamplingParams()])
def test_device_sampler_draws_what_the_host_sampler_draws(params):
    """backends/torch/sampling.py (run on CUDA) is the same contract: same uniforms bit for bit,
    same filters, same inverse-CDF pick — checked here on CPU tensors, 64 seeds x 8 steps."""
    from types import SimpleNamespace

    from backends.torch import sampling as device
    from minimind_core import sampling as host

    seeds = [0, 1, -5, 2**63 - 1] + list(range(100, 160))
    steps = [s * 7 % 11 for s in range(len(seeds))]
    np.testing.assert_array_equal(
        device.uniform(torch.tensor([s % (1 << 64) - (1 << 64) * (s % (1 << 64) >= 1 << 63)
                                     for s in seeds]), torch.tensor(steps)).numpy(),
        host.uniform(seeds, steps))
    logits = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]] * len(seeds), dtype=np.float32))
    histories = [[i % 5] for i in range(len(seeds))]
    for step in range(8):
        rows = [SimpleNamespace(params=params, history=h, seed=s, drawn=step)
                for h, s in zip(histories, seeds)]
        got = device.sample(torch.from_numpy(logits), rows)
        want = host.sample(logits, params, histories, seeds, [step] * len(seeds))
        np.testing.assert_array_equal(got, want)


def test_prefix_cache_chunked_prefill_and_growth_keep_every_row(model):
    """The loop the server's scheduler runs: prefix reuse, prompts prefilled in chunks while
    other rows decode, and a cache that grows under running rows — each row's tokens as alone."""
    path, _, _ = model
    for backend, engine in both_backends(path):
        p, pp = prompt_pair(engine)
        params = SamplingParams(max_new_tokens=12, **SAMPLED)
        turn2 = pp + p[:4]  # shares pp with the first request
        long = (pp * 40)[:300]  # longer than the first cache: it must grow
        want = {k: [int(t[0]) for t in engine.iter_tokens([ids], params, seed=3)]
                for k, ids in (("first", pp), ("turn2", turn2), ("long", long))}
        with engine.exclusive():
            loop = TokenLoop(engine, 2, 64, prefix_cache=4, chunk=16)
            assert loop.cache.max_len == 256
            got = {k: [] for k in want}
            rows = {"first": loop.add(pp, params, 3, reserve=12)}
            while loop.rows:
                for row, token in loop.step():
                    name = next(k for k, r in rows.items() if r is row)
                    got[name].append(token)
                    if len(got[name]) == 12:
                        loop.remove(row)
                        if name == "first":  # its slot keeps pp + 11 fed tokens
                            rows["turn2"] = loop.add(turn2, params, 3, reserve=12)
                            assert rows["turn2"].cached_tokens == len(pp)
                            rows["long"] = loop.add(long, params, 3, reserve=12)
                            assert loop.cache.max_len == 512  # grew, rows kept
            loop.close()
        assert got == want, backend


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_prefill_in_chunks_equals_one_prefill(model, chunk):
    """Chunks of any size at any start (a single later token sees every earlier key)."""
    path, _, _ = model
    for _, engine in both_backends(path):
        ids = engine.encode("hello world, 你好, once more")
        want = engine.logits(ids)[-1]
        cache = engine._cache_for(1, 64)
        slot = cache.alloc()
        for i in range(0, len(ids), chunk):
            logits = engine._prefill(cache, slot, ids[i:i + chunk])
        cache.free(slot)
        np.testing.assert_allclose(engine._to_numpy(logits), want, atol=1e-4)


def test_rows_prefilled_together_equal_the_reference(model):
    """One packed prefill of three rows (one from position 0, one continuing its cached first
    half, one single token after its cache) gives each row transformers' logits (the oracle),
    and the keys it wrote carry the next decode step."""
    path, config, weights = model
    ref = hf_model(config, weights)
    for backend, engine in both_backends(path):
        a = engine.encode("hello world, 你好, once more")
        b = engine.encode("a second, longer prompt about the sea and ships")
        c = engine.encode("three")
        cache = engine._cache_for(3, 64)
        slots = [cache.alloc() for _ in range(3)]
        engine._prefill(cache, slots[1], b[:5])
        engine._prefill(cache, slots[2], c[:-1])
        with engine.exclusive():
            out = engine._prefill_rows(cache, [(slots[0], a), (slots[1], b[5:]),
                                               (slots[2], c[-1:])])
            nxt = np.array([7, 8, 9])
            step = engine._to_numpy(engine._decode_step(cache, np.array(slots), nxt))
        for i, ids in enumerate((a, b, c)):
            with torch.no_grad():
                want = ref(torch.tensor([ids + [int(nxt[i])]])).logits[0].numpy()
            np.testing.assert_allclose(engine._to_numpy(out[i]), want[-2], atol=1e-4,
                                       err_msg=backend)
            np.testing.assert_allclose(step[i], want[-1], atol=1e-4, err_msg=backend)
        for slot in slots:
            cache.free(slot)


def test_logprobs_are_log_softmax_of_the_model_logits(model):
    """Generated and prompt logprobs against transformers' logits (the oracle) to 1e-4; the
    top-N lists are its N largest log-softmax values in order."""
    path, config, weights = model
    engine = load(path, backend="torch", device="cpu")
    p, pp = prompt_pair(engine)
    r = engine.generate(pp, max_new_tokens=8, logprobs=3, temperature=0.9, seed=2)
    assert [lp.token for lp in r.logprobs] == r.token_ids
    ref = hf_model(config, weights)
    with torch.no_grad():
        logits = ref(torch.tensor([pp + r.token_ids])).logits[0].double()
    want = torch.log_softmax(logits, dim=-1).numpy()
    for i, lp in enumerate(r.logprobs):
        row = want[len(pp) - 1 + i]
        assert abs(lp.logprob - row[lp.token]) < 1e-4
        top = np.argsort(-row)[:3]
        assert [t for t, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], row[top], atol=1e-4)
    prompt = engine.prompt_logprobs(pp, top=2)
    assert prompt[0] is None and len(prompt) == len(pp)
    for i in range(1, len(pp)):
        assert abs(prompt[i].logprob - want[i - 1][pp[i]]) < 1e-4
    # streamed: the logprobs ride on the chunks, in order, one per token
    chunks = list(engine.stream(pp, max_new_tokens=8, logprobs=0, temperature=0.9, seed=2))
    streamed = [lp for c in chunks for lp in (c.logprobs or [])]
    assert [lp.token for lp in streamed] == r.token_ids
    assert all(lp.top == [] for lp in streamed)


def test_forked_rows_share_one_prefill(model):
    """n > 1 choices: one prefill, the keys copied; each choice = a solo run with its seed."""
    path, _, _ = model
    for backend, engine in both_backends(path):
        _, pp = prompt_pair(engine)
        params = SamplingParams(max_new_tokens=10, **SAMPLED)
        want = [[int(t[0]) for t in engine.iter_tokens([pp], params, seed=s)] for s in (1, 2, 3)]
        calls = []
        prefill = engine._prefill_rows
        engine._prefill_rows = lambda *a, calls=calls, prefill=prefill: (calls.append(1)
                                                                         or prefill(*a))
        with engine.exclusive():
            loop = TokenLoop(engine, 4, 64)
            rows = [loop.add(pp, params, 1)]
            rows += [loop.fork(rows[0], s) for s in (2, 3)]
            got = [[] for _ in rows]
            for _ in range(10):
                for row, token in loop.step():
                    got[rows.index(row)].append(token)
            loop.close()
        assert got == want and len(calls) == 1, backend
