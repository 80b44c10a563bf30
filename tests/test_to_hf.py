"""converters.to_hf: exported folders load with stock transformers and match TorchEngine
(MiniMind2-MoE as GraniteMoeShared in detail: test_to_hf_moe.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_lora import lora_state, save_lora  # noqa: E402

from converters import to_hf  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.checkpoint import read_safetensors  # noqa: E402

PROMPT = [1, 5, 77, 200, 31, 9, 402, 17, 88, 3, 250, 11]
STOCK = {"minimind2": "LlamaForCausalLM", "minimind2-moe": "GraniteMoeSharedForCausalLM",
         "minimind3": "Qwen3ForCausalLM", "minimind3-moe": "Qwen3MoeForCausalLM"}


def torch_logits(path, ids=PROMPT, **kw):
    return load(path, backend="torch", device="cpu", dtype="float32", **kw).logits(ids)


def hf_logits(folder, ids=PROMPT):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return type(model).__name__, model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("kind", list(STOCK))
def test_stock_transformers_loads_export(kind, make_checkpoint, tmp_path):
    path, config, weights = make_checkpoint(kind)
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    expected = torch_logits(path)
    cls, got = hf_logits(dst)
    assert cls == STOCK[kind]
    assert np.abs(got - expected).max() <= 1e-4
    # the folder loads back through our own reader, weights unchanged
    np.testing.assert_allclose(torch_logits(dst), expected, atol=1e-6, rtol=0)
    stored = read_safetensors(dst / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: stored once, as on the hub
    np.testing.assert_array_equal(stored["model.layers.1.self_attn.q_proj.weight"],
                                  weights["model.layers.1.self_attn.q_proj.weight"])
    # tokenizer files come along and give the same ids
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    ours = load(dst, backend="torch", device="cpu").tokenizer
    assert tok.encode("hello world, 你好") == ours.encode("hello world, 你好")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(dtype, make_checkpoint, tmp_path):
    path, _, weights = make_checkpoint("minimind3")
    dst = to_hf.convert(path, tmp_path / "hf", dtype=dtype, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst)  # dtype from config.json
    tdtype = getattr(torch, dtype)
    assert model.dtype == tdtype
    key = "model.layers.0.mlp.up_proj.weight"
    expected = torch.from_numpy(weights[key]).to(tdtype)  # torch's own rounding as the reference
    assert torch.equal(model.state_dict()[key], expected)
    assert json.loads((dst / "config.json").read_text())["dtype"] == dtype


def test_yarn_is_exported(make_checkpoint, tmp_path):
    path, _, _ = make_checkpoint("minimind3")
    ids = list(range(3, 300, 5))
    dst = to_hf.convert(path, tmp_path / "hf", overrides={"inference_rope_scaling": True},
                        progress=False)
    expected = torch_logits(path, ids, inference_rope_scaling=True)
    assert np.abs(expected - torch_logits(path, ids)).max() > 1e-2  # YaRN changes the output
    assert np.abs(hf_logits(dst, ids)[1] - expected).max() <= 1e-4
    assert np.abs(torch_logits(dst, ids) - expected).max() <= 1e-6


def test_lora_merged_into_export(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    lora_file = save_lora(lora_state(config), path.parent / "lora" / "x_128.pth")
    dst = to_hf.convert(path, tmp_path / "hf", lora=lora_file, progress=False)
    expected = torch_logits(path, lora=lora_file)
    assert np.abs(hf_logits(dst)[1] - expected).max() <= 1e-4
    assert json.loads((dst / "config.json").read_text())["minimind"]["lora"] == str(lora_file)


def test_bad_inputs(make_checkpoint, tmp_path, capsys):
    path, _, _ = make_checkpoint("minimind2")
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        to_hf.convert(path, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep"]
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        to_hf.convert(path, tmp_path / "x", dtype="int4", progress=False)
    not_a_model = tmp_path / "notes.pth"
    not_a_model.write_bytes(b"hello")
    with pytest.raises(ValueError, match="notes.pth"):
        to_hf.convert(not_a_model, tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError, match="source not found"):
        to_hf.convert(tmp_path / "missing.pth", tmp_path / "z", progress=False)
    assert to_hf.main([str(path), str(dst), "--quiet"]) == 2  # refused input: exit 2
    assert "exists" in capsys.readouterr().err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "minimind2-0")
    assert left == ["hf", "notes.pth"]  # nothing half-written
    assert to_hf.main([str(path), str(dst), "--force", "--quiet", "--dtype", "int4"]) == 2
    assert ("unknown dtype 'int4'; choose from float32, float16, bfloat16 or auto"
            in capsys.readouterr().err)
    # --force never empties a folder we did not write
    assert to_hf.main([str(path), str(dst), "--force", "--quiet"]) == 2
    assert "holds keep, which we did not write" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep"]
    # the command line takes the same aliases as load(): fp16 is float16
    (dst / "keep").unlink()
    assert to_hf.main([str(path), str(dst), "--force", "--quiet", "--dtype", "fp16"]) == 0
    assert (dst / "model.safetensors").is_file()
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"


def test_interrupted_write_leaves_nothing(make_checkpoint, tmp_path, monkeypatch):
    path, _, _ = make_checkpoint("minimind2")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(to_hf, "generation_config", boom)
    with pytest.raises(KeyboardInterrupt):
        to_hf.convert(path, tmp_path / "hf", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["minimind2-0"]


def test_outputs_have_ordinary_permissions(make_checkpoint, tmp_path):
    """mkdtemp/mkstemp create 0700/0600; written models must be readable like any file."""
    import os
    import stat

    from converters.merge_lora import merge
    from converters.to_hf import convert

    path, config, _ = make_checkpoint("minimind2")
    mask = os.umask(0o022)
    try:
        folder = convert(path, tmp_path / "hf", progress=False)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        lora = tmp_path / "lora.pth"
        torch = pytest.importorskip("torch")
        torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(8, 128),
                    "model.layers.0.self_attn.q_proj.lora.B.weight": torch.zeros(128, 8)}, lora)
        out = merge(path, lora, tmp_path / "merged.safetensors")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
    finally:
        os.umask(mask)


@pytest.mark.parametrize("yarn", [False, True])
def test_folder_saved_by_transformers_5_reads_its_rope_parameters(yarn, make_checkpoint,
                                                                  tmp_path):
    """transformers 5 saves theta (and YaRN) only under ``rope_parameters``; a folder it saved
    gives the logits transformers computes from it (the oracle), not the default theta's."""
    path, _, _ = make_checkpoint("minimind3")
    ids = list(range(3, 300, 5))
    overrides = {"rope_theta": 5000.0, **({"inference_rope_scaling": True} if yarn else {})}
    dst = to_hf.convert(path, tmp_path / "hf", overrides=overrides, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    model.save_pretrained(tmp_path / "resaved")
    (tmp_path / "resaved" / "tokenizer.json").write_bytes((dst / "tokenizer.json").read_bytes())
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    if "rope_theta" in saved:
        pytest.skip("this transformers writes rope_theta at the top level")
    assert saved["rope_parameters"]["rope_theta"] == 5000.0
    want = hf_logits(tmp_path / "resaved", ids)[1]
    np.testing.assert_allclose(torch_logits(tmp_path / "resaved", ids), want, atol=1e-4)
