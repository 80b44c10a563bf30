"""converters.to_mlx: folders that stock mlx_lm loads with the same logits as MlxEngine (and as
TorchEngine on the source), quantized sizes, provenance, atomic writing and bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

from conftest import RELEASE_LIKE, random_weights, release_like, save_pth, tiny_config  # noqa: E402

from converters import to_mlx  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.checkpoint import CheckpointError, load_checkpoint  # noqa: E402

pytestmark = pytest.mark.mlx

PROMPT = [1, 5, 77, 200, 31, 9, 302, 17, 88, 3, 250, 11, 64, 140]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


def _heads(config):
    return {"num_attention_heads": config.num_attention_heads}


def _convert(path, config, dst, **kw):
    kw.setdefault("progress", False)
    return to_mlx.convert(path, dst, overrides=_heads(config), **kw)


def _stock_logits(folder, ids=PROMPT):
    """Logits from stock mlx_lm's own model class for the folder's model_type."""
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    model.set_dtype(mx.float32)  # MLX's CPU kernels for quantized fp16 are slow; fp32 is exact here
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


STOCK_TYPES = {"minimind2": "llama", "minimind2-moe": "bailing_moe", "minimind3": "qwen3",
               "minimind3-moe": "qwen3_moe"}


def _stock_greedy(model, ids, n):
    """n greedy tokens from stock mlx_lm's own decode loop (argmax, no eos stop)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1))
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("name", list(RELEASE_LIKE))
def test_folder_loads_in_stock_mlx_lm(make_checkpoint, tmp_path, name):
    kind, shape = release_like(name)
    path, config, _ = make_checkpoint(kind, **shape)
    dst = _convert(path, config, tmp_path / "mlx", dtype="float32")
    meta = json.loads((dst / "config.json").read_text())
    assert meta["model_type"] == STOCK_TYPES[kind] and "quantization" not in meta
    block = meta["minimind"]
    assert block["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert block["generation"] == config.generation and block["source"] == str(path)
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]

    model, tokenizer = mlx_lm.load(str(dst))  # model and tokenizer, as a user runs it
    assert type(model).__module__ == f"mlx_lm.models.{STOCK_TYPES[kind]}"  # stock, not ours
    torch_engine = load(path, backend="torch", **_heads(config))
    assert tokenizer.encode("hello world") == torch_engine.tokenizer.encode("hello world")
    stock = np.array(model(mx.array([PROMPT]))[0])
    ours = load(dst, backend="mlx", device="cpu").logits(PROMPT)
    torch_logits = torch_engine.logits(PROMPT)
    assert np.abs(stock - ours).max() <= 1e-4
    assert np.abs(stock - torch_logits).max() <= 1e-4
    greedy = [int(row[0]) for row in torch_engine.iter_tokens([PROMPT], max_new_tokens=12)]
    assert _stock_greedy(model, PROMPT, 12) == greedy


def test_minimind2_moe_is_stock_bailing_moe_and_reads_back(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2-moe", n_shared_experts=2)
    dst = _convert(path, config, tmp_path / "mlx", dtype="float32")
    meta = json.loads((dst / "config.json").read_text())
    assert meta["model_type"] == "bailing_moe" and meta["num_shared_experts"] == 2
    names = set(mx.load(str(dst / "model.safetensors")))
    assert "model.layers.0.attention.query_key_value.weight" in names  # bailing's own names
    assert "model.layers.0.mlp.shared_experts.down_proj.weight" in names  # one wider FFN
    torch_logits = load(path, backend="torch", **_heads(config)).logits(PROMPT)
    model, _ = mlx_lm.load(str(dst))
    assert np.abs(np.array(model(mx.array([PROMPT]))[0]) - torch_logits).max() <= 1e-4
    # both of our backends read the stock folder back
    assert np.abs(load(dst, backend="mlx", device="cpu").logits(PROMPT) - torch_logits).max() <= 1e-4
    assert np.abs(load(dst, backend="torch").logits(PROMPT) - torch_logits).max() <= 1e-4
    # quantized: stock mlx_lm and our MLX loader agree on the same packed weights
    q8 = _convert(path, config, tmp_path / "q8", dtype="float32", q_bits=8)
    assert np.abs(_stock_logits(q8) - load(q8, backend="mlx", device="cpu").logits(PROMPT)).max() <= 1e-4


def test_minimind2_moe_refuses_an_adapter_folder(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2-moe")
    lora_file = path.parent / "lora.pth"
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, config.hidden_size),
                "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(config.hidden_size, 4)},
               lora_file)
    with pytest.raises(ValueError, match=r"\(bailing_moe\) fuses q/k/v"):
        _convert(path, config, tmp_path / "mlx", lora=lora_file, lora_adapter_out=tmp_path / "ad")
    assert not (tmp_path / "mlx").exists() and not (tmp_path / "ad").exists()


def test_quantized_sizes_and_stock_parity(tmp_path, tokenizer_dir):
    # Big enough for the ratio to mean something: hidden 256, vocab 6400 (every width divides 64).
    config = tiny_config("minimind3", hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=32, intermediate_size=832, vocab_size=6400)
    root = tmp_path / "src"
    shutil.copytree(tokenizer_dir, root / "model")
    path = save_pth(random_weights(config, 0), root / "out" / "full_sft_256.pth")
    folders = {bits: to_mlx.convert(path, tmp_path / f"q{bits}", q_bits=bits or None,
                                    dtype="float16", progress=False) for bits in (0, 8, 4)}
    size = {bits: (f / "model.safetensors").stat().st_size for bits, f in folders.items()}
    assert size[4] <= 0.30 * size[0]
    assert size[4] < size[8] <= 0.56 * size[0]
    for bits in (8, 4):
        meta = json.loads((folders[bits] / "config.json").read_text())
        expected = {"group_size": 64, "bits": bits, "mode": "affine"}
        assert meta["quantization"] == expected and meta["quantization_config"] == expected
        engine = load(folders[bits], backend="mlx", device="cpu")
        assert engine.info["quantization"] == expected
        assert np.abs(_stock_logits(folders[bits]) - engine.logits(PROMPT)).max() <= 1e-3
    full = load(folders[0], backend="mlx", device="cpu").logits(PROMPT)
    q8 = load(folders[8], backend="mlx", device="cpu").logits(PROMPT)
    assert np.abs(q8 - full).max() < 0.05 * np.abs(full).max()


def test_lora_is_merged_before_converting(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind3")
    rng = np.random.default_rng(5)
    state = {}
    for i in range(config.num_hidden_layers):
        for name in ("q_proj", "o_proj"):
            module = f"model.layers.{i}.self_attn.{name}"
            state[f"{module}.lora.A.weight"] = torch.from_numpy(
                (0.1 * rng.standard_normal((4, config.hidden_size))).astype(np.float32))
            state[f"{module}.lora.B.weight"] = torch.from_numpy(
                (0.1 * rng.standard_normal((config.hidden_size, 4))).astype(np.float32))
    lora_file = path.parent / "lora" / "lora_x_64.pth"
    lora_file.parent.mkdir()
    torch.save(state, lora_file)
    dst = _convert(path, config, tmp_path / "mlx", dtype="float32", lora=lora_file)
    assert json.loads((dst / "config.json").read_text())["minimind"]["lora"] == str(lora_file)
    # reference: the same merge done by hand, W + B @ A, run by the torch backend
    ckpt = load_checkpoint(path)
    for i in range(config.num_hidden_layers):
        for name in ("q_proj", "o_proj"):
            module = f"model.layers.{i}.self_attn.{name}"
            a, b = (state[f"{module}.lora.{x}.weight"].numpy() for x in "AB")
            ckpt.weights[f"{module}.weight"] = ckpt.weights[f"{module}.weight"] + b @ a
    merged = save_pth(ckpt.weights, tmp_path / "merged" / "m.pth")
    expected = load(merged, backend="torch", tokenizer=path.parents[1] / "model").logits(PROMPT)
    base = load(path, backend="torch").logits(PROMPT)
    assert np.abs(expected - base).max() > 1e-2
    assert np.abs(_stock_logits(dst) - expected).max() <= 1e-3


def test_shards_with_an_index_above_the_limit(make_checkpoint, tmp_path, monkeypatch):
    import backends.mlx.load as mlx_load

    monkeypatch.setattr(mlx_load, "MAX_SHARD_BYTES", 200_000)
    path, config, _ = make_checkpoint("minimind3")
    dst = _convert(path, config, tmp_path / "mlx", dtype="float32")
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    expected = load(path, backend="torch").logits(PROMPT)
    assert np.abs(_stock_logits(dst) - expected).max() <= 1e-3
    assert np.abs(load(dst, backend="torch").logits(PROMPT) - expected).max() <= 1e-3


# --- bad inputs and atomic writing ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"dtype": "float8"}, ValueError, "dtype"),
    ({"q_bits": 3}, ValueError, "bits"),
    ({"q_bits": 4, "q_group_size": 100}, ValueError, "group size"),
])
def test_bad_settings_fail_before_reading(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        to_mlx.convert(tmp_path / "does-not-matter.pth", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind3")
    dst = tmp_path / "mlx"
    dst.mkdir()
    (dst / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="force"):
        _convert(path, config, dst)
    assert (dst / "old.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="holds old.txt, which we did not write"):
        _convert(path, config, dst, force=True)  # --force never empties a folder not ours
    assert (dst / "old.txt").read_text() == "keep me"
    (dst / "old.txt").unlink()
    _convert(path, config, dst, force=True)
    _convert(path, config, dst, force=True)  # our own output: replaced
    assert (dst / "model.safetensors").is_file()
    assert _no_leftovers(tmp_path) == []


def test_source_that_is_not_a_model(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        to_mlx.convert(missing, tmp_path / "a", progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        to_mlx.convert(text, tmp_path / "b", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        to_mlx.convert(empty, tmp_path / "c", progress=False)
    not_minimind = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, not_minimind)
    with pytest.raises(ValueError, match="not a MiniMind"):
        to_mlx.convert(not_minimind, tmp_path / "d", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.txt", "other.pth"]


def test_no_tokenizer_is_an_error_not_a_half_folder(tmp_path):
    config = tiny_config("minimind3")
    path = save_pth(random_weights(config), tmp_path / "lonely" / "full_sft_64.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        to_mlx.convert(path, tmp_path / "mlx", progress=False)
    assert not (tmp_path / "mlx").exists()


def test_interrupted_write_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    import backends.mlx.load as mlx_load

    def broken(model, folder, max_shard_bytes=None):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_load, "save_weights", broken)
    path, config, _ = make_checkpoint("minimind3")
    with pytest.raises(KeyboardInterrupt):
        _convert(path, config, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists() and _no_leftovers(tmp_path) == []


def test_command_line(make_checkpoint, tmp_path, capsys):
    path, _, _ = make_checkpoint("minimind3")  # MiniMind-3: head count comes from the weights
    dst = tmp_path / "q8"
    assert to_mlx.main([str(path), str(dst), "--q-bits", "8", "--dtype", "bf16"]) == 0  # an alias
    err = capsys.readouterr().err
    assert "quantizing to 8 bits" in err and "wrote" in err
    meta = json.loads((dst / "config.json").read_text())
    assert meta["quantization"]["bits"] == 8 and meta["torch_dtype"] == "bfloat16"
    assert to_mlx.main([str(path), str(dst), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        to_mlx.main([str(path), str(dst), "--q-bits", "3"])
    assert exit_info.value.code == 2
    assert to_mlx.main([str(path), str(tmp_path / "x"), "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'; choose from float32, float16, bfloat16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
