"""converters.to_gguf without llama.cpp: the file read back with gguf-py's own reader (metadata,
tensor names, shapes and types), the q/k permutation against both RoPE definitions, the
Modelfile, refusals (the source always byte-identical), atomic writing and the command lines.
llama.cpp's own parity checks are in test_gguf_llama_cpp.py."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from conftest import random_weights, save_pth, tiny_config  # noqa: E402

from converters import gguf_arch, to_gguf  # noqa: E402

pytestmark = pytest.mark.torch


def _heads(config):
    return {"num_attention_heads": config.num_attention_heads}


def _export(path, config, dst, **kw):
    kw.setdefault("progress", False)
    overrides = {**_heads(config), **kw.pop("overrides", {})}
    return to_gguf.convert(path, dst, overrides=overrides, **kw)


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _tensors(reader):
    return {t.name: t for t in reader.tensors}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the q/k permutation ------------------------------------------------------------------------

def test_permutation_by_hand():
    # one head of 4 rows: rotate-half pairs (0, 2) and (1, 3) become adjacent pairs
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert gguf_arch.permute_rope(w, 1).tolist() == [w[0].tolist(), w[2].tolist(),
                                                      w[1].tolist(), w[3].tolist()]
    two_heads = np.arange(8, dtype=np.float32)[:, None]
    assert gguf_arch.permute_rope(two_heads, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _rope_rotate_half(q, pos, theta=1e6):
    """FORMATS.md: pairs (i, i + d/2), cos = cat(cos(t f), cos(t f))."""
    d = q.shape[-1]
    f = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * f), np.sin(pos * f)
    a, b = q[..., : d // 2], q[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_interleaved(q, pos, theta=1e6):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: pairs (2i, 2i + 1) rotated by t f_i."""
    d = q.shape[-1]
    f = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * f), np.sin(pos * f)
    a, b = q[..., 0::2], q[..., 1::2]
    out = np.empty_like(q)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_permuted_weights_give_the_same_attention_scores_under_interleaved_rope():
    rng = np.random.default_rng(0)
    heads, kv_heads, d, hidden = 4, 2, 8, 16
    wq, wk = rng.standard_normal((heads * d, hidden)), rng.standard_normal((kv_heads * d, hidden))
    x1, x2 = rng.standard_normal(hidden), rng.standard_normal(hidden)
    pq, pk = gguf_arch.permute_rope(wq, heads), gguf_arch.permute_rope(wk, kv_heads)
    for h in range(heads):
        g = h // (heads // kv_heads)
        q_ours = _rope_rotate_half((wq @ x1).reshape(heads, d)[h], 7)
        k_ours = _rope_rotate_half((wk @ x2).reshape(kv_heads, d)[g], 3)
        q_cpp = _rope_interleaved((pq @ x1).reshape(heads, d)[h], 7)
        k_cpp = _rope_interleaved((pk @ x2).reshape(kv_heads, d)[g], 3)
        assert np.isclose(q_ours @ k_ours, q_cpp @ k_cpp, rtol=1e-10)
    # without the permutation, llama.cpp's rope would give other scores
    q_wrong = _rope_interleaved((wq @ x1).reshape(heads, d)[0], 7)
    k_wrong = _rope_interleaved((wk @ x2).reshape(kv_heads, d)[0], 3)
    assert not np.isclose(q_ours @ k_ours, q_wrong @ k_wrong, rtol=1e-3)


# --- metadata and tensors -------------------------------------------------------------------------

@pytest.mark.parametrize("kind, arch", [("minimind2", "llama"), ("minimind2-moe", "granitemoe"),
                                        ("minimind3", "qwen3"), ("minimind3-moe", "qwen3moe")])
def test_architecture_keys_and_tensors(make_checkpoint, tmp_path, kind, arch):
    path, config, weights = make_checkpoint(kind, n_shared_experts=2) if kind == "minimind2-moe" \
        else make_checkpoint(kind)
    out = _export(path, config, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    meta, tensors = _fields(reader), _tensors(reader)
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == config.num_hidden_layers
    assert meta[f"{arch}.embedding_length"] == config.hidden_size
    assert meta[f"{arch}.attention.head_count"] == config.num_attention_heads
    assert meta[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    assert meta[f"{arch}.attention.key_length"] == config.head_dim
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(1e6)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert meta[f"{arch}.context_length"] == 32768
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert list(tensors["token_embd.weight"].shape) == [config.hidden_size, config.vocab_size]
    q = tensors["blk.0.attn_q.weight"].data.reshape(config.num_attention_heads * 16, -1)
    raw_q = weights["model.layers.0.self_attn.q_proj.weight"]
    if arch in ("llama", "granitemoe"):  # rows permuted per head (16 rows a head here)
        assert np.array_equal(q[:16], raw_q[:16][[0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]])
    else:
        assert np.array_equal(q, raw_q)
        assert "blk.1.attn_k_norm.weight" in tensors
    if config.use_moe:
        assert meta[f"{arch}.expert_count"] == 4
        assert meta[f"{arch}.expert_used_count"] == config.num_experts_per_tok
        assert meta[f"{arch}.expert_feed_forward_length"] == config.intermediate_size
        # stacked experts: ggml's {in, out, n_expert}; expert 3's rows are its own
        gate = tensors["blk.1.ffn_gate_exps.weight"]
        assert list(gate.shape) == [config.hidden_size, config.intermediate_size, 4]
        assert np.array_equal(gate.data[3], weights["model.layers.1.mlp.experts.3.gate_proj.weight"])
    if arch == "granitemoe":
        assert meta["granitemoe.logit_scale"] == 1.0
        assert "granitemoe.residual_scale" not in meta and "granitemoe.embedding_scale" not in meta
        assert meta["granitemoe.expert_shared_feed_forward_length"] == 2 * config.intermediate_size
        down = tensors["blk.0.ffn_down_shexp.weight"].data  # [hidden, 2 ffn]: columns joined
        assert np.array_equal(down[:, config.intermediate_size:],
                              weights["model.layers.0.mlp.shared_experts.1.down_proj.weight"])


def test_tokenizer_metadata_minimind3(tmp_path, real_checkpoint):
    path, config = real_checkpoint(tmp_path, "minimind3", "minimind3")
    meta_file = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    added = {t["content"]: t for t in json.loads(
        (tmp_path / "model" / "tokenizer.json").read_text())["added_tokens"]}
    reader = gguf.GGUFReader(_export(path, config, tmp_path / "m.gguf"))
    meta = _fields(reader)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == added[meta_file["bos_token"]]["id"] == 1
    assert meta["tokenizer.ggml.eos_token_id"] == added[meta_file["eos_token"]]["id"] == 2
    assert meta["tokenizer.ggml.eot_token_id"] == added["<|im_end|>"]["id"]
    assert meta["tokenizer.ggml.padding_token_id"] == added[meta_file["pad_token"]]["id"] == 0
    assert meta["tokenizer.ggml.unknown_token_id"] == added[meta_file["unk_token"]]["id"]
    assert meta["tokenizer.chat_template"] == meta_file["chat_template"]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 6400
    for content, spec in added.items():
        assert tokens[spec["id"]] == content
        assert types[spec["id"]] == (3 if spec["special"] else 4), content  # CONTROL / USER_DEFINED
    assert types[added["<think>"]["id"]] == 4 and types[added["<|im_start|>"]["id"]] == 3
    assert set(types[36:]) == {1}  # everything else NORMAL
    merges = json.loads((tmp_path / "model" / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"][:3] == [" ".join(m) for m in merges[:3]]


def test_smaller_tokenizer_is_padded_with_unused_tokens(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")  # tokenizer of 400, model vocab 512
    meta = _fields(gguf.GGUFReader(_export(path, config, tmp_path / "m.gguf")))
    assert len(meta["tokenizer.ggml.tokens"]) == 512
    assert meta["tokenizer.ggml.tokens"][400:402] == ["[PAD400]", "[PAD401]"]
    assert set(meta["tokenizer.ggml.token_type"][400:]) == {5}  # UNUSED


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, real_checkpoint):
    path, config = real_checkpoint(tmp_path, "minimind2", "minimind2")
    small = tiny_config("minimind2")  # vocab 512 < the real tokenizer's 6400
    path = save_pth(random_weights(small), tmp_path / "out" / "small.pth")
    with pytest.raises(ValueError, match="6400 tokens but the model only 512"):
        _export(path, small, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizers_llama_cpp_has_and_one_it_has_not(make_checkpoint, tmp_path):
    from minimind_core.demo import demo_model_path

    meta = _fields(gguf.GGUFReader(to_gguf.convert(demo_model_path(), tmp_path / "demo.gguf",
                                                   progress=False)))
    assert meta["tokenizer.ggml.pre"] == "qwen2"  # Qwen2's regex split, then ByteLevel
    path, config, _ = make_checkpoint("minimind2")
    tok_json = path.parents[1] / "model" / "tokenizer.json"
    data = json.loads(tok_json.read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True  # llama.cpp's gpt-2 never adds one
    tok_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the pre-tokenizer is"):
        _export(path, config, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("outtype, matrix", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"),
                                             ("q4_0", "Q4_0")])
def test_outtypes_keep_norms_and_router_f32(make_checkpoint, tmp_path, outtype, matrix):
    path, config, weights = make_checkpoint("minimind3-moe")
    reader = gguf.GGUFReader(_export(path, config, tmp_path / "m.gguf", outtype=outtype))
    tensors = _tensors(reader)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == matrix
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == matrix
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    file_type = {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[outtype]
    assert _fields(reader)["general.file_type"] == file_type
    # the values round-trip through gguf-py's own dequantizer within the type's precision
    t = tensors["blk.0.attn_q.weight"]
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(128, 128)
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    # q4_0: codes -8..7 of d = max/-8 per block of 32, so at most max|w| / 8 off
    tol = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": np.abs(w).max() / 8}[outtype]
    assert np.abs(back - w).max() <= tol


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_block(make_checkpoint, tmp_path, capsys):
    path, config, _ = make_checkpoint("minimind2", intermediate_size=200)  # 200 % 32 != 0
    out = _export(path, config, tmp_path / "m.gguf", outtype="q8_0", progress=True)
    tensors = _tensors(gguf.GGUFReader(out))
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # rows of 200
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"  # rows of 128
    assert "2 matrices whose rows are not a multiple of 32 were written as f16" in capsys.readouterr().err


def test_yarn_keys(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind3")
    meta = _fields(gguf.GGUFReader(_export(path, config, tmp_path / "m.gguf",
                                           overrides={"inference_rope_scaling": True})))
    assert meta["qwen3.rope.scaling.type"] == "yarn"
    assert meta["qwen3.rope.scaling.factor"] == 16.0
    assert meta["qwen3.rope.scaling.original_context_length"] == 2048
    # upstream's attention_factor 1.0 over llama.cpp's own 1 + 0.1 ln(16)
    assert meta["qwen3.rope.scaling.attn_factor"] == pytest.approx(1 / (1 + 0.1 * math.log(16)))
    plain = _fields(gguf.GGUFReader(_export(path, config, tmp_path / "p.gguf")))
    assert not any(k.startswith("qwen3.rope.scaling") for k in plain)


def test_yarn_betas_llama_cpp_ignores_are_refused(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind3")
    scaling = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048,
               "beta_fast": 16, "beta_slow": 1, "attention_factor": 1.0}
    with pytest.raises(ValueError, match="beta_fast/beta_slow"):
        _export(path, config, tmp_path / "m.gguf", overrides={"rope_scaling": scaling})
    assert not (tmp_path / "m.gguf").exists()


def test_minimind2_moe_top1_has_no_exact_architecture(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2-moe")
    with pytest.raises(ValueError, match="does not renormalise"):
        _export(path, config, tmp_path / "m.gguf", overrides={"num_experts_per_tok": 1})
    assert not (tmp_path / "m.gguf").exists()


def test_provenance(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    meta = _fields(gguf.GGUFReader(_export(path, config, tmp_path / "m.gguf")))
    assert meta["minimind.source_sha256"] == _sha(path)
    assert meta["minimind.kind"] == "minimind2" and meta["general.name"] == "m"
    assert meta["minimind.converter"].startswith("minimind-core ")


@pytest.mark.parametrize("kind", ["minimind2-moe", "minimind3-moe"])
def test_every_source_form_gives_the_same_file(make_checkpoint, tmp_path, kind):
    """.pth, our transformers folder and our MLX folder (MiniMind2-MoE: stock bailing_moe) all
    read through checkpoint.py into identical GGUF tensors."""
    from converters import to_hf

    path, config, _ = make_checkpoint(kind)
    sources = {"pth": path, "hf": to_hf.convert(path, tmp_path / "hf", overrides=_heads(config),
                                                progress=False)}
    if kind == "minimind2-moe":
        pytest.importorskip("mlx.core")
        from converters import to_mlx

        sources["mlx"] = to_mlx.convert(path, tmp_path / "mlx", dtype="float32",
                                        overrides=_heads(config), progress=False)
    tensors = {}
    for name, src in sources.items():
        reader = gguf.GGUFReader(_export(src, config, tmp_path / f"{name}.gguf"))
        tensors[name] = {t.name: np.array(t.data) for t in reader.tensors}
    for name in sources:
        assert tensors[name].keys() == tensors["pth"].keys()
        assert all(np.array_equal(tensors[name][k], v) for k, v in tensors["pth"].items()), name


# --- the Modelfile ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["minimind2", "minimind3"])
def test_modelfile(make_checkpoint, tmp_path, kind):
    path, config, _ = make_checkpoint(kind)
    out = _export(path, config, tmp_path / "tiny.gguf")
    text = (tmp_path / "tiny.Modelfile").read_text()
    assert "FROM ./tiny.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER temperature 0.0" in text and "PARAMETER top_p 1.0" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in template
    assert template.count("{{") == template.count("}}")
    opened = sum(template.count(f"{{{{{dash} {kw} ") for kw in ("if", "range") for dash in ("", "-"))
    assert opened == template.count("end }}")  # every if/range closed
    if kind == "minimind2":
        assert "<|im_start|>system\nYou are a helpful assistant<|im_end|>" in template
        assert "<think>" not in template
    else:
        assert "You are a helpful assistant" not in template
        assert "<think>\n\n</think>\n\n" in template and "$.Think" in template
    assert out.is_file()


# --- refusals, atomic writing, command lines ----------------------------------------------------

def test_bad_input_is_refused_and_the_source_is_untouched(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    before = _sha(path)
    with pytest.raises(FileNotFoundError, match="source not found"):
        to_gguf.convert(tmp_path / "missing.pth", tmp_path / "a.gguf", progress=False)
    with pytest.raises(ValueError, match="is the input"):
        to_gguf.convert(path, path, force=True, progress=False)
    with pytest.raises(ValueError, match=r"\*\.gguf"):
        _export(path, config, tmp_path / "a.bin")
    with pytest.raises(ValueError, match="unknown outtype 'q2_k'"):
        _export(path, config, tmp_path / "a.gguf", outtype="q2_k")
    tok_json = path.parents[1] / "model" / "tokenizer.json"
    tok_before = _sha(tok_json)
    link = tmp_path / "link.gguf"
    link.symlink_to(tok_json)  # OUT that resolves to an input, even with --force
    with pytest.raises(ValueError, match="the input"):
        _export(path, config, link, force=True)
    link.unlink()
    assert _sha(tok_json) == tok_before
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="--force"):
        _export(path, config, existing)
    assert existing.read_bytes() == b"user data" and not (tmp_path / "old.Modelfile").exists()
    (tmp_path / "side.Modelfile").write_text("mine")
    with pytest.raises(FileExistsError, match="side.Modelfile"):
        _export(path, config, tmp_path / "side.gguf")
    assert (tmp_path / "side.Modelfile").read_text() == "mine"
    assert not (tmp_path / "side.gguf").exists() and not (tmp_path / "a.gguf").exists()
    assert _sha(path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_replaced_with_force(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    _export(path, config, out, force=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_interrupted_write_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    path, config, _ = make_checkpoint("minimind3")
    real = gguf_arch.gguf_tensors

    def broken(cfg, weights):
        for i, item in enumerate(real(cfg, weights)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(gguf_arch, "gguf_tensors", broken)
    with pytest.raises(KeyboardInterrupt):
        _export(path, config, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.Modelfile").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_lines(make_checkpoint, tmp_path, capsys):
    from minimind_core.cli.entry import main as minimind

    path, config, _ = make_checkpoint("minimind3")  # heads come from the weights
    out = tmp_path / "a.gguf"
    assert to_gguf.main([str(path), str(out), "--outtype", "f16"]) == 0
    assert "wrote" in capsys.readouterr().err
    assert to_gguf.main([str(path), str(out), "--quiet"]) == 2  # refused input
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        to_gguf.main([str(path), str(out), "--outtype", "q2_k"])
    assert exit_info.value.code == 2
    b = tmp_path / "b.gguf"
    assert minimind(["convert", "--to", "gguf", str(path), str(b), "--outtype", "q8_0"]) == 0
    assert _tensors(gguf.GGUFReader(b))["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert minimind(["convert", "--to", "gguf", str(path), str(tmp_path / "c.gguf"),
                     "--dtype", "bf16"]) == 0
    assert _tensors(gguf.GGUFReader(tmp_path / "c.gguf"))["blk.0.attn_q.weight"].tensor_type.name == "BF16"
    assert minimind(["convert", "--to", "gguf", str(path), str(tmp_path / "d.gguf"),
                     "--q-bits", "4"]) != 0
    assert minimind(["convert", "--to", "mlx", str(path), str(tmp_path / "e"),
                     "--outtype", "f16"]) != 0
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "e").exists()
