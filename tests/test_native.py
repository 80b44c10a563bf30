"""The C-assisted CPU decode step (backends/torch/native.py) gives the plain torch step's numbers,
for every kind, batches of rows at different positions, long caches and LoRA; and it steps aside cleanly when
it cannot run (no compiler, a failing compiler, disabled, fp16, unmerged LoRA)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_lora import lora_state, save_lora  # noqa: E402

from backends.torch import cbuild, native  # noqa: E402
from minimind_core import load  # noqa: E402

KINDS = ["minimind2", "minimind2-moe", "minimind3", "minimind3-moe"]
PROMPTS = [[1, 5, 9], list(range(3, 40)), [1, 200, 300, 40], [7] * 11]
needs_native = pytest.mark.skipif(native.library() is None, reason="no working C compiler")


def engines(path, **kw):
    nat = load(path, backend="torch", device="cpu", **kw)
    ref = load(path, backend="torch", device="cpu", decode="eager", **kw)
    return nat, ref


def step_logits(engine, prompts, tokens: np.ndarray) -> torch.Tensor:
    """Prefill ``prompts`` (one slot each), then feed ``tokens`` [steps, B] one step at a time:
    the logits of every step."""
    cache = engine._cache_for(len(prompts), max(map(len, prompts)) + len(tokens))
    slots = np.array([cache.alloc() for _ in prompts])
    try:
        for slot, ids in zip(slots, prompts):
            engine._prefill(cache, int(slot), ids)
        return torch.stack([engine._decode_step(cache, slots, t).clone() for t in tokens])
    finally:
        for slot in slots:
            cache.free(int(slot))


def runs_native(engine) -> bool:
    return isinstance(engine._impls.get("native"), native.NativeStep)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_native_step_matches_torch_step(kind, make_checkpoint):
    path, config, _ = make_checkpoint(kind)
    nat, ref = engines(path)
    assert (nat.info["decode"], ref.info["decode"]) == ("native", "eager")
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (12, len(PROMPTS)))
    got, want = step_logits(nat, PROMPTS, tokens), step_logits(ref, PROMPTS, tokens)
    assert runs_native(nat) and not runs_native(ref)
    assert got.shape == (12, len(PROMPTS), config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and whole generations, greedy and sampled, are the same tokens
    for kw in ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 3},
               {"repetition_penalty": 1.3}):
        a = nat.generate_batch(PROMPTS, max_new_tokens=16, **kw)
        b = ref.generate_batch(PROMPTS, max_new_tokens=16, **kw)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


@needs_native
def test_long_cache_and_cache_changes(make_checkpoint):
    """A 300-token prompt (the cache grows past one 256 step) and a batch-size change in between:
    each new cache gets a decoder bound to its own buffers."""
    path, _, _ = make_checkpoint("minimind3", max_position_embeddings=1024)
    nat, ref = engines(path)
    long = [list(np.random.default_rng(1).integers(3, 400, 300))]
    for prompts in (long, PROMPTS, long):
        a = nat.generate_batch(prompts, max_new_tokens=20)
        b = ref.generate_batch(prompts, max_new_tokens=20)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert nat._cache.max_len == 512


@needs_native
def test_head_sizes_and_a_single_kv_head(make_checkpoint):
    """head_dim 8, 12 and 48 with hidden 100 (tails of the 8-wide dot product), 1 kv head for
    4 q heads."""
    for head_dim, heads, kv in ((8, 4, 1), (12, 4, 2), (48, 4, 2)):
        path, config, _ = make_checkpoint("minimind3", seed=head_dim, head_dim=head_dim,
                                          hidden_size=100, num_attention_heads=heads,
                                          num_key_value_heads=kv)
        nat, ref = engines(path)
        tokens = np.random.default_rng(2).integers(3, config.vocab_size, (6, 2))
        got = step_logits(nat, PROMPTS[:2], tokens)
        torch.testing.assert_close(got, step_logits(ref, PROMPTS[:2], tokens), rtol=1e-5,
                                   atol=1e-5)


@needs_native
def test_lora_merged_runs_native_unmerged_steps_aside(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    adapter = save_lora(lora_state(config), tmp_path / "lora.pth")
    for merge in (True, False):
        nat, ref = engines(path, lora=adapter, merge_lora=merge)
        tokens = np.random.default_rng(3).integers(3, config.vocab_size, (5, len(PROMPTS)))
        got, want = step_logits(nat, PROMPTS, tokens), step_logits(ref, PROMPTS, tokens)
        assert runs_native(nat) == merge
        assert nat.info["decode"] == ("native" if merge else "eager")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    nat.set_lora(None)  # unmerged adapter removed: the native step comes back, on the base
    assert nat.info["decode"] == "native"
    base = load(path, backend="torch", device="cpu", decode="eager")
    assert nat.generate(PROMPTS[1], max_new_tokens=12).token_ids == \
        base.generate(PROMPTS[1], max_new_tokens=12).token_ids
    assert runs_native(nat)


@needs_native
def test_set_lora_between_generations_of_one_batch_size(make_checkpoint, tmp_path):
    """The cache (and so its native step) survives set_lora: the step must still be rebuilt."""
    path, config, _ = make_checkpoint("minimind3")
    adapter = save_lora(lora_state(config), tmp_path / "lora.pth")
    nat, ref = engines(path)
    for lora, merge in ((None, False), (adapter, False), (adapter, True), (None, False)):
        for engine in (nat, ref):
            engine.set_lora(lora, merge=merge)
        a = nat.generate_batch(PROMPTS, max_new_tokens=12)
        b = ref.generate_batch(PROMPTS, max_new_tokens=12)
        assert [r.token_ids for r in a] == [r.token_ids for r in b], (lora, merge)


@needs_native
def test_cache_grows_for_the_same_batch_size(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2", max_position_embeddings=1024)
    nat, ref = engines(path)
    rng = np.random.default_rng(4)
    for length in (10, 300, 10):
        prompt = rng.integers(3, 400, length).tolist()
        assert nat.generate(prompt, max_new_tokens=16).token_ids == \
            ref.generate(prompt, max_new_tokens=16).token_ids
        if length == 300:
            assert nat._cache.max_len == 512
            nat.logits(rng.integers(3, 400, 700).tolist())  # past the cache, inside the window


def test_not_used_off_cpu_fp32(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    assert load(path, backend="torch", device="cpu", dtype="bfloat16").info["decode"] == "eager"
    assert not native.supported(load(path, backend="torch", device="cpu").model,
                                torch.device("cpu"), torch.float16)


def test_label_follows_what_runs(make_checkpoint):
    path, _, _ = make_checkpoint("minimind3", seed=5, head_dim=1040, num_attention_heads=2,
                                 num_key_value_heads=1)
    engine = load(path, backend="torch", device="cpu")  # too wide for the C attention
    assert engine.info["decode"] == "eager" and engine.describe()["decode"] == "eager"
    assert engine.generate([1, 2, 3], max_new_tokens=3).token_ids


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native.library() builds again, into an empty cache folder (returns the build folder)."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "native"
    native._lib = None  # the next user rebuilds (or finds the real cache) again


def assert_falls_back(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch", device="cpu")
    assert engine.info["decode"] == "eager" and engine._native is None
    ref = load(path, backend="torch", device="cpu", decode="eager")
    assert engine.generate(PROMPTS[1], max_new_tokens=8).token_ids == \
        ref.generate(PROMPTS[1], max_new_tokens=8).token_ids


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"CC": "false"},
                                 {"MINIMIND_NATIVE": "0"}])
def test_falls_back_to_torch_without_a_compiler(env, fresh_build, monkeypatch, make_checkpoint,
                                                caplog):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert_falls_back(make_checkpoint)
    assert not list(fresh_build.glob("*.so")) and not list(fresh_build.glob("*.tmp"))
    if env.get("CC") == "false":  # a failed build is remembered: no second attempt
        assert "failed" in caplog.text and len(list(fresh_build.glob("*.failed"))) == 1
        native._lib = None
        monkeypatch.setattr(cbuild.subprocess, "Popen", None)  # calling it would raise
        assert native.library() is None


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")
def test_a_hanging_compiler_is_killed(fresh_build, monkeypatch, make_checkpoint, tmp_path):
    script = tmp_path / "slowcc"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {tmp_path}/child\nwait\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT", 1)
    t = time.monotonic()
    assert_falls_back(make_checkpoint)
    assert time.monotonic() - t < 30
    assert not list(fresh_build.glob("*.tmp")) and list(fresh_build.glob("*.failed"))
    child = (tmp_path / "child").read_text().strip()
    time.sleep(0.2)
    status = Path(f"/proc/{child}/status")
    if status.exists():  # gone, or a zombie waiting for its reaper: not sleeping on
        assert "zombie" in status.read_text().lower()


@pytest.mark.parametrize("cache", ["no-home", "under-a-file"])
def test_falls_back_without_a_usable_cache_folder(cache, fresh_build, monkeypatch,
                                                  make_checkpoint, tmp_path):
    if cache == "no-home":
        monkeypatch.delenv("MINIMIND_CACHE")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

        def no_home():
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", staticmethod(no_home))
    else:
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "file" / "cache"))
    assert_falls_back(make_checkpoint)


@needs_native
def test_compiler_with_arguments(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "cc -O2")
    assert native.library() is not None and len(list(fresh_build.glob("kernels-*.so"))) == 1


@needs_native
def test_builds_once_into_the_cache(fresh_build):
    lib = native.library()
    built = list(fresh_build.glob("kernels-*.so"))
    assert lib is not None and len(built) == 1 and list(fresh_build.iterdir()) == built
    native._lib = None
    mtime = built[0].stat().st_mtime_ns
    assert native.library() is not None and built[0].stat().st_mtime_ns == mtime  # reused


@needs_native
def test_step_refuses_what_would_write_out_of_bounds(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch", device="cpu")
    cache = engine._cache_for(1, 10)
    step = engine._step("native", cache)
    for slot, pos in ((0, cache.max_len + 1), (1, 3), (-1, 3), (0, -1)):
        with pytest.raises(ValueError, match="refused its arguments"):
            step(np.array([slot]), np.array([pos]), np.array([5]))
    with pytest.raises(ValueError, match="2 rows"):
        step(np.array([0, 0]), np.array([3]), np.array([5]))


@needs_native
def test_long_batches_switch_to_torch_mid_generation(make_checkpoint, monkeypatch):
    """Past NATIVE_MAX_ROW_KEYS a batch continues on the torch step, on the same cache."""
    from backends.torch import engine as torch_engine

    monkeypatch.setattr(torch_engine, "NATIVE_MAX_ROW_KEYS", len(PROMPTS) * 45)
    path, _, _ = make_checkpoint("minimind3")
    nat, ref = engines(path)
    calls = []
    real = native.NativeStep.__call__
    monkeypatch.setattr(native.NativeStep, "__call__", lambda self, slots, positions, tokens:
                        calls.append(int(positions.max())) or real(self, slots, positions, tokens))
    a = nat.generate_batch(PROMPTS, max_new_tokens=20)  # the longest prompt is 37 tokens
    b = ref.generate_batch(PROMPTS, max_new_tokens=20)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert calls == list(range(37, 45))  # native while 4 rows x (pos + 1) keys <= 4 x 45
    one = nat.generate(PROMPTS[1], max_new_tokens=20)  # a single row always runs native
    assert one.token_ids == b[1].token_ids and calls[-1] == 37 + 18


@pytest.mark.skipif(native.library() is None, reason="no working C compiler")
def test_silu_mul_matches_torch_over_the_whole_float_range():
    """kernels.c's vectorisable exp (Cephes' expf) inside silu_mul against torch's SiLU (libm's
    expf): within a few float32 ulps everywhere, saturating without inf at the ends, NaN kept."""
    import torch
    import torch.nn.functional as F

    lib = native.library()
    g = torch.cat([torch.linspace(-120, 120, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30,
                                                                   87.0, -87.0, 89.0, -89.0])])
    u = torch.linspace(-3, 3, g.numel())
    h = torch.cat([g, u])[None].contiguous()
    out = torch.empty(1, g.numel())
    lib.silu_mul(out.data_ptr(), h.data_ptr(), 1, g.numel())
    want = F.silu(g.double()) * u.double()
    torch.testing.assert_close(out[0].double(), want, rtol=4e-7, atol=1e-30)
    nan = torch.tensor([[float("nan"), 1.0]])
    lib.silu_mul(out.data_ptr(), nan.data_ptr(), 1, 1)
    assert torch.isnan(out[0, 0])
