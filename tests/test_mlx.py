"""MlxEngine against the torch backend (an independent implementation) on tiny random models of
all four kinds, plus RoPE against the rotate-half formula, the .pth cache, quantization at load
time and bad arguments."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

from conftest import KINDS, random_weights, save_pth, tiny_config  # noqa: E402

from minimind_core import load  # noqa: E402
from minimind_core.config import YARN_DEFAULTS  # noqa: E402
from minimind_core.rope import rope_cos_sin  # noqa: E402

pytestmark = pytest.mark.mlx

PROMPT = [1, 5, 77, 200, 31, 9, 302, 17, 88, 3, 250, 11, 64, 64, 140, 7, 399, 2, 1, 45]
MESSAGES = [{"role": "system", "content": "You are a tiny model."},
            {"role": "user", "content": "hello world, how are you today?"}]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every test converts .pth files into its own cache folder, never the user's."""
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


def _heads(config):
    # MiniMind2 head counts cannot be read from the weights; tell both engines the same.
    return {"num_attention_heads": config.num_attention_heads}


def _pair(make_checkpoint, kind, **overrides):
    path, config, _ = make_checkpoint(kind)
    kw = {**_heads(config), **overrides}
    return load(path, backend="torch", **kw), load(path, backend="mlx", device="cpu", **kw)


# --- parity with the torch backend ---------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_fp32_logits_and_greedy_tokens_match_torch(make_checkpoint, kind):
    te, me = _pair(make_checkpoint, kind)
    assert me.config == te.config
    a, b = te.logits(PROMPT), me.logits(PROMPT)
    assert b.shape == (len(PROMPT), te.config.vocab_size) and b.dtype == np.float32
    assert np.abs(a - b).max() <= 1e-3
    ra = te.generate(PROMPT, max_new_tokens=16, temperature=0)
    rb = me.generate(PROMPT, max_new_tokens=16, temperature=0)
    assert rb.token_ids == ra.token_ids and len(rb.token_ids) >= 1
    assert rb.text == ra.text and rb.finish_reason == ra.finish_reason


@pytest.mark.parametrize("kind", ["minimind2", "minimind3-moe"])
def test_yarn_matches_torch(make_checkpoint, kind):
    # A non-unit attention factor makes the YaRN path visible even on a short prompt.
    yarn = {"inference_rope_scaling": True, "rope_scaling": {**YARN_DEFAULTS, "attention_factor": 0.8}}
    te, me = _pair(make_checkpoint, kind, **yarn)
    plain, _ = _pair(make_checkpoint, kind)
    a = te.logits(PROMPT)
    assert np.abs(a - plain.logits(PROMPT)).max() > 1e-2  # YaRN really changes the model
    assert np.abs(a - me.logits(PROMPT)).max() <= 1e-3
    assert (me.generate(PROMPT, max_new_tokens=8).token_ids
            == te.generate(PROMPT, max_new_tokens=8).token_ids)


def test_rope_follows_the_rotate_half_formula():
    """mx.fast.rope takes periods, not angular frequencies: check against cos/sin tables."""
    from backends.mlx.model import RoPE

    config = tiny_config("minimind3", inference_rope_scaling=True,
                         rope_scaling={**YARN_DEFAULTS, "attention_factor": 0.7})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 9, config.head_dim)).astype(np.float32)
    offset = 5
    cos, sin = rope_cos_sin(config, offset + 9)
    cos, sin = cos[offset:], sin[offset:]
    half = config.head_dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    expected = x * cos + rotated * sin
    got = np.array(RoPE(config)(mx.array(x), offset))
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_rmsnorm_rounds_like_each_generation_in_fp16(weight_in_fp32):
    """FORMATS.md: MiniMind2 ``w * (x.float() * r).type_as(x)``; MiniMind-3 ``(w * x.float() * r).type_as(x)``."""
    from backends.mlx.model import RMSNorm

    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((64, 256))).astype(np.float16)
    w = (1 + 0.3 * rng.standard_normal(256)).astype(np.float16)
    xf = x.astype(np.float32)
    normed = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + np.float32(1e-5))
    minimind2 = w * normed.astype(np.float16)  # fp16 product, rounded once more
    minimind3 = (w.astype(np.float32) * normed).astype(np.float16)
    norm = RMSNorm(256, 1e-5, weight_in_fp32)
    norm.weight = mx.array(w)
    got = np.array(norm(mx.array(x)))
    want, other = (minimind3, minimind2) if weight_in_fp32 else (minimind2, minimind3)
    assert got.dtype == np.float16
    assert (got == want).mean() >= 0.999  # an ulp here and there from rsqrt
    assert (got == other).mean() < 0.95  # the two roundings really differ on this input

@pytest.mark.parametrize("kind", ["minimind2", "minimind3"])
def test_half_precision_close_to_torch(make_checkpoint, kind):
    path, config, _ = make_checkpoint(kind)
    te = load(path, backend="torch", dtype="float16", **_heads(config))
    me = load(path, backend="mlx", device="cpu", dtype="float16", **_heads(config))
    assert me.info["dtype"] == "float16"
    assert np.abs(te.logits(PROMPT) - me.logits(PROMPT)).max() < 2e-2


def test_moe_runs_in_half_precision_on_cpu(make_checkpoint):
    # MLX's CPU gather_mm is fp32-only; the model must still run MoE in fp16 there.
    path, config, _ = make_checkpoint("minimind2-moe")
    me = load(path, backend="mlx", device="cpu", dtype="float16", **_heads(config))
    assert np.isfinite(me.logits(PROMPT)).all()


def test_chat_prompt_ids_and_answers_match_torch(make_checkpoint):
    te, me = _pair(make_checkpoint, "minimind3")
    ids = me.chat_ids(MESSAGES)
    assert ids == te.chat_ids(MESSAGES)
    assert ids == te.tokenizer.encode(te.formatter.render(MESSAGES))
    ra, rb = te.chat(MESSAGES, max_new_tokens=12), me.chat(MESSAGES, max_new_tokens=12)
    assert rb.prompt_tokens == len(ids)
    assert rb.token_ids == ra.token_ids



@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_real_tokenizers_give_identical_prompt_ids(real_tokenizer, tmp_path, generation):
    """Upstream's own tokenizers and templates: both backends send transformers' prompt ids."""
    folder = real_tokenizer(generation)
    transformers = pytest.importorskip("transformers")
    config = tiny_config(generation, vocab_size=6400)
    path = save_pth(random_weights(config), tmp_path / "out" / "full_sft_64.pth")
    kw = {"tokenizer": folder, **_heads(config)}
    te, me = load(path, backend="torch", **kw), load(path, backend="mlx", device="cpu", **kw)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    conversations = [MESSAGES[1:], MESSAGES,
                     [*MESSAGES, {"role": "assistant", "content": "fine"},
                      {"role": "user", "content": "你好"}]]
    for messages in conversations:
        ids = me.chat_ids(messages)
        assert ids == te.chat_ids(messages)
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, Mapping) else expected
        assert ids == list(expected)
    assert (me.chat(MESSAGES, max_new_tokens=8).token_ids
            == te.chat(MESSAGES, max_new_tokens=8).token_ids)

# --- the token loop ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["minimind2", "minimind3-moe"])
def test_batch_equals_rows_one_by_one(make_checkpoint, kind):
    te, me = _pair(make_checkpoint, kind)
    prompts = [PROMPT, PROMPT[3:11], [1, 9, 9]]
    batch = me.generate_batch(prompts, max_new_tokens=10)
    single = [me.generate(p, max_new_tokens=10) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]
    assert [r.token_ids for r in batch] == [r.token_ids for r in te.generate_batch(prompts, max_new_tokens=10)]


def test_repetition_penalty_matches_torch(make_checkpoint):
    te, me = _pair(make_checkpoint, "minimind3")
    kw = {"max_new_tokens": 20, "repetition_penalty": 1.8, "repetition_context_size": 6}
    plain = me.generate(PROMPT, max_new_tokens=20).token_ids
    a, b = te.generate(PROMPT, **kw).token_ids, me.generate(PROMPT, **kw).token_ids
    assert b == a
    assert b != plain  # the penalty did something on this prompt
    prompts = [PROMPT, PROMPT[5:]]
    batch = me.generate_batch(prompts, **kw)
    assert [r.token_ids for r in batch] == [me.generate(p, **kw).token_ids for p in prompts]


def test_seeded_sampling_is_reproducible(make_checkpoint):
    path, config, _ = make_checkpoint("minimind2")
    me = load(path, backend="mlx", device="cpu", **_heads(config))
    kw = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    first = me.generate(PROMPT, seed=7, **kw).token_ids
    assert me.generate(PROMPT, seed=7, **kw).token_ids == first
    others = {tuple(me.generate(PROMPT, seed=s, **kw).token_ids) for s in range(8, 12)}
    assert others != {tuple(first)}
    # top_k=1 is greedy whatever the temperature
    greedy = me.generate(PROMPT, max_new_tokens=12).token_ids
    assert me.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=3).token_ids == greedy


def test_stream_ends_with_finish_reason_and_usage(make_checkpoint):
    _, me = _pair(make_checkpoint, "minimind3")
    chunks = list(me.stream(PROMPT, max_new_tokens=5))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == len(PROMPT)
    assert "".join(c.text for c in chunks) == me.generate(PROMPT, max_new_tokens=5).text


# --- loading -------------------------------------------------------------------------------------

def test_pth_is_converted_once_into_a_cache_keyed_by_sha256(make_checkpoint, tmp_path, monkeypatch):
    path, config, _ = make_checkpoint("minimind2-moe")
    first = load(path, backend="mlx", device="cpu", num_experts_per_tok=1, **_heads(config))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = tmp_path / "cache" / "mlx" / sha
    assert first.info["mlx_cache"] == str(folder) and (folder / "model.safetensors").is_file()

    # The second load reads the cache: it must not need torch at all.
    import minimind_core.checkpoint as checkpoint

    def no_torch(p):
        raise AssertionError(f"read {p} with torch although it is cached")

    monkeypatch.setattr(checkpoint, "_read_torch_file", no_torch)
    second = load(path, backend="mlx", device="cpu", **_heads(config))
    # Overrides of the first load do not stick to the cache.
    assert first.config.num_experts_per_tok == 1 and second.config.num_experts_per_tok == 2
    monkeypatch.undo()
    torch_engine = load(path, backend="torch", **_heads(config))
    assert np.abs(second.logits(PROMPT) - torch_engine.logits(PROMPT)).max() <= 1e-3


def test_cache_keeps_half_precision_files_lossless(tmp_path, tokenizer_dir):
    import shutil

    config = tiny_config("minimind3")
    path = save_pth(random_weights(config, 3), tmp_path / "m" / "out" / "full_sft_64.pth",
                    dtype=torch.float16)
    shutil.copytree(tokenizer_dir, tmp_path / "m" / "model")
    te = load(path, backend="torch", dtype="float32")
    for _ in range(2):  # the conversion, then the cache
        me = load(path, backend="mlx", device="cpu")
        assert me.info["file_dtype"] == "float16"
        assert np.abs(me.logits(PROMPT) - te.logits(PROMPT)).max() <= 1e-3


def test_pth_without_torch_says_what_to_install(make_checkpoint, monkeypatch):
    path, config, _ = make_checkpoint("minimind3")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch"):
        load(path, backend="mlx", device="cpu")


def test_quantize_at_load(make_checkpoint):
    path, config, _ = make_checkpoint("minimind3", hidden_size=128, intermediate_size=256,
                                      head_dim=32)
    full = load(path, backend="mlx", device="cpu")
    q8 = load(path, backend="mlx", device="cpu", quantize=8)
    assert full.info["quantization"] is None
    assert q8.info["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    import mlx.nn as nn

    assert isinstance(q8.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    a, b = full.logits(PROMPT), q8.logits(PROMPT)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("kwargs, match", [
    ({"quantize": 3}, "bits"),
    ({"quantize": 4, "q_group_size": 48}, "group size"),
    ({"dtype": "float8"}, "dtype"),
    ({"device": "tpu"}, "device"),
])
def test_bad_arguments(make_checkpoint, kwargs, match):
    path, config, _ = make_checkpoint("minimind3")
    with pytest.raises(ValueError, match=match):
        load(path, backend="mlx", **kwargs)


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="a GPU is there")
def test_gpu_asked_for_without_one(make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")
    with pytest.raises(ValueError, match="no GPU"):
        load(path, backend="mlx", device="gpu")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.pth", backend="mlx")

