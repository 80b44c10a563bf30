"""converters.to_gguf against llama.cpp itself (llama-cpp-python, the ``gguf-test`` extra).

f32 weights and an f32 KV cache (``type_k``/``type_v`` 0), flash attention off: llama.cpp's
default f16 cache alone moves logits by ~4e-3. The five exports are made once per module.
Outside CI these tests skip without llama-cpp-python; in CI (CI=true) its absence is a failure.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:
    import llama_cpp
except ImportError:
    if os.environ.get("CI") == "true":
        pytest.fail("llama-cpp-python is missing in CI: .ci/run installs it with "
                    "pip install -e '.[gguf-test]'", pytrace=False)
    pytest.skip("llama-cpp-python not installed (pip install 'minimind-core[gguf-test]')",
                allow_module_level=True)

from conftest import (  # noqa: E402
    RELEASE_LIKE,
    release_like,
)

from converters import to_gguf  # noqa: E402
from minimind_core import load  # noqa: E402

pytestmark = pytest.mark.torch

F32_CACHE = 0  # GGML_TYPE_F32
PROMPT = [1, 5, 77, 200, 31, 9, 302, 17, 88, 3, 250, 11, 64, 140, 4000, 6399, 2, 1]
HARD_STRINGS = [
    "你好，世界！今天天气很好。",
    "emoji 😀🎉👍🏽 and 🇨🇳",
    "digits 1234567890 3.14159 1,000,000 2026-12-01",
    "   leading spaces and trailing   ",
    "new\nlines\n\n\ttabs\r\n end",
    "It's a test: don't, won't, I'm; (parens) [brackets] {braces} <tags>",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<think>\n先想一想\n</think>\n\n答案是 42<tool_call>{\"name\": \"f\"}</tool_call>",
    "mixed中文English混合123abc！？。",
]


def _heads(config):
    return {"num_attention_heads": config.num_attention_heads}


def _llama(path, n_ctx=256):
    """llama.cpp on ``path``: f32 KV cache, no flash attention, one thread, every position's
    logits, and no weight repacking: some VMs (this Firecracker one) report AMX in cpuid but
    raise SIGILL on its tile instructions, which ggml's AMX buffer runs for q8_0 weights."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", no_repack):
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, type_k=F32_CACHE,
                               type_v=F32_CACHE, flash_attn=False, n_threads=1, verbose=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _llama_greedy(llm, ids, n):
    out = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def _our_greedy(engine, ids, n):
    return [int(row[0]) for row in engine.iter_tokens([ids], max_new_tokens=n)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, real_checkpoint):
    """The five release-like configs, each exported once as f32: name → (pth, gguf, config)."""
    out = {}
    for name in RELEASE_LIKE:
        kind, shape = release_like(name)
        root = tmp_path_factory.mktemp(name)
        tokenizer = "minimind3" if kind.startswith("minimind3") else "minimind2"
        path, config = real_checkpoint(root, kind, tokenizer=tokenizer, **shape)
        gguf_file = to_gguf.convert(path, root / f"{name}.gguf", overrides=_heads(config),
                                    progress=False)
        out[name] = (path, gguf_file, config)
    return out


@pytest.fixture(scope="module")
def llamas(exports):
    return {name: _llama(gguf_file) for name, (_, gguf_file, _) in exports.items()}


@pytest.mark.parametrize("name", list(RELEASE_LIKE))
def test_logits_and_greedy_match_torch(exports, llamas, name):
    path, _, config = exports[name]
    engine = load(path, backend="torch", **_heads(config))
    ours = engine.logits(PROMPT)
    theirs = _llama_logits(llamas[name], PROMPT)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 2e-4, name
    assert _llama_greedy(llamas[name], PROMPT, 24) == _our_greedy(engine, PROMPT, 24)


@pytest.mark.parametrize("name", ["minimind2-small", "minimind-3"])
def test_tokenization_is_identical_on_hard_strings(exports, llamas, name):
    path, _, config = exports[name]
    tok = load(path, backend="torch", **_heads(config)).tokenizer
    llm = llamas[name]
    for text in HARD_STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


def test_control_tokens_vanish_user_defined_tokens_stay(exports, llamas):
    path, _, config = exports["minimind-3"]
    tok = load(path, backend="torch", **_heads(config)).tokenizer
    llm = llamas["minimind-3"]
    for token in ("<think>", "</think>", "<tool_call>", "</tool_call>"):  # USER_DEFINED
        assert llm.detokenize([tok.token_to_id(token)]) == token.encode()
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):  # CONTROL
        assert llm.detokenize([tok.token_to_id(token)]) == b""
    meta = json.loads((tok.path / "tokenizer_config.json").read_text())
    assert llm.token_bos() == tok.token_to_id(meta["bos_token"])
    assert llm.token_eos() == tok.token_to_id(meta["eos_token"])
    assert llm.metadata["tokenizer.chat_template"] == meta["chat_template"]


@pytest.mark.parametrize("name", ["minimind2-small", "minimind-3"])
def test_chat_completion_reproduces_our_greedy_reply(exports, llamas, name):
    path, _, config = exports[name]
    engine = load(path, backend="torch", **_heads(config))
    messages = [{"role": "system", "content": "你是一个助手"},
                {"role": "user", "content": "你好，请介绍一下你自己"}]
    ours = engine.chat(messages, max_new_tokens=20)
    r = llamas[name].create_chat_completion(messages, temperature=0.0, max_tokens=20)
    assert r["usage"]["prompt_tokens"] == len(engine.chat_ids(messages, max_new_tokens=20))
    assert r["usage"]["completion_tokens"] == ours.completion_tokens
    assert r["choices"][0]["finish_reason"] == ours.finish_reason
    reply = [i for i in ours.token_ids if i not in engine.tokenizer.stop_token_ids]
    # llama.cpp's own decoder on our ids (it drops the space of " ?" etc., as documented)
    assert r["choices"][0]["message"]["content"] == llamas[name].detokenize(reply).decode()


def test_merged_lora(tmp_path, real_checkpoint):
    path, config = real_checkpoint(tmp_path, "minimind2")
    rng = np.random.default_rng(3)
    state = {}
    for i in range(config.num_hidden_layers):
        for proj in ("q_proj", "o_proj"):  # q is permuted after the merge: both must hold
            module = f"model.layers.{i}.self_attn.{proj}"
            state[f"{module}.lora.A.weight"] = torch.from_numpy(
                (0.1 * rng.standard_normal((8, config.hidden_size))).astype(np.float32))
            state[f"{module}.lora.B.weight"] = torch.from_numpy(
                (0.1 * rng.standard_normal((config.hidden_size, 8))).astype(np.float32))
    lora_file = tmp_path / "out" / "lora" / "lora_x_128.pth"
    lora_file.parent.mkdir()
    torch.save(state, lora_file)
    out = to_gguf.convert(path, tmp_path / "lora.gguf", lora=lora_file, overrides=_heads(config),
                          progress=False)
    expected = load(path, backend="torch", lora=lora_file, merge_lora=True).logits(PROMPT)
    base = load(path, backend="torch").logits(PROMPT)
    assert np.abs(expected - base).max() > 1e-2  # the LoRA matters
    assert np.abs(_llama_logits(_llama(out), PROMPT) - expected).max() <= 2e-4


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("kind, outtype, bound", [
    ("minimind2", "f16", 0.9999), ("minimind2", "bf16", 0.999), ("minimind2", "q8_0", 0.999),
    ("minimind3", "q8_0", 0.999), ("minimind2-moe", "q8_0", 0.999),
    ("minimind3-moe", "f16", 0.9999), ("minimind3-moe", "q8_0", 0.999),
])
def test_quantized_outtypes_cosine(tmp_path, kind, outtype, bound, real_checkpoint):
    tokenizer = "minimind3" if kind.startswith("minimind3") else "minimind2"
    path, config = real_checkpoint(tmp_path, kind, tokenizer=tokenizer)
    out = to_gguf.convert(path, tmp_path / f"{outtype}.gguf", outtype=outtype,
                          overrides=_heads(config), progress=False)
    f32 = to_gguf.convert(path, tmp_path / "f32.gguf", overrides=_heads(config), progress=False)
    ours = load(path, backend="torch", **_heads(config)).logits(PROMPT)
    quantized = _llama_logits(_llama(out), PROMPT)
    per_position = np.array([_cosine(q, o) for q, o in zip(quantized, ours)])
    if config.use_moe:
        # q8_0 activations can flip a near-tied expert choice at a position (then that row
        # differs a lot): most positions must still agree closely
        assert np.median(per_position) >= bound and (per_position >= 0.99).mean() >= 0.85
    else:
        assert _cosine(quantized, ours) >= bound
    assert out.stat().st_size < 0.6 * f32.stat().st_size


def test_yarn_keys_match_our_engine(tmp_path, real_checkpoint):
    path, config = real_checkpoint(tmp_path, "minimind3", tokenizer="minimind3")
    out = to_gguf.convert(path, tmp_path / "yarn.gguf", progress=False,
                          overrides={"inference_rope_scaling": True})
    ours = load(path, backend="torch", inference_rope_scaling=True).logits(PROMPT)
    plain = load(path, backend="torch").logits(PROMPT)
    assert np.abs(ours - plain).max() > 1e-2  # YaRN changes these logits
    assert np.abs(_llama_logits(_llama(out), PROMPT) - ours).max() <= 2e-4


def test_the_embedded_demo_model(tmp_path):
    from minimind_core.demo import demo_model_path

    demo = demo_model_path()  # its tokenizer splits with Qwen2's regex: pre-tokenizer qwen2
    out = to_gguf.convert(demo, tmp_path / "demo.gguf", progress=False)
    llm = _llama(out)
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen2"
    engine = load(demo, backend="torch")
    for text in HARD_STRINGS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == engine.tokenizer.encode(text), text
    ids = engine.chat_ids([{"role": "user", "content": "你好"}])
    assert np.abs(_llama_logits(llm, ids) - engine.logits(ids)).max() <= 2e-4
