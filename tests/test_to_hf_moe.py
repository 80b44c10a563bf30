"""MiniMind2-MoE exported as stock transformers' GraniteMoeSharedForCausalLM: parity with
TorchEngine and with upstream's routing formula, names and shapes as the installed transformers
builds them, the round trip through our own load() on both backends, and every refusal."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cli_helpers import assert_one_line_error, run  # noqa: E402
from test_lora import lora_state, save_lora  # noqa: E402
from test_torch_parity import hf_greedy, hf_model  # noqa: E402

from converters import to_hf  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.checkpoint import read_safetensors  # noqa: E402

pytestmark = pytest.mark.torch

PROMPT = [1, 5, 77, 200, 31, 9, 402, 17, 88, 3, 250, 11]
N_TOKENS = 24
HAS_MLX = importlib.util.find_spec("mlx") is not None


def ours(path, **kw):
    return load(path, backend="torch", device="cpu", dtype="float32", **kw)


def stock(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def stock_logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def our_greedy(engine, ids, n=N_TOKENS):
    from minimind_core.params import SamplingParams

    steps = engine.iter_tokens([ids], SamplingParams(max_new_tokens=n, temperature=0.0))
    tokens = [int(next(steps)[0]) for _ in range(n)]
    steps.close()
    return tokens


@pytest.mark.parametrize("n_shared", [1, 2])
def test_granite_export_matches_ours_and_upstream(n_shared, make_checkpoint, tmp_path):
    path, config, weights = make_checkpoint("minimind2-moe", n_shared_experts=n_shared)
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    model = stock(dst)
    assert type(model).__name__ == "GraniteMoeSharedForCausalLM"
    # the installed transformers' own parameters have the shapes the issue names
    E, ff, h = config.num_experts, config.intermediate_size, config.hidden_size
    layer = model.model.layers[0]
    assert tuple(layer.block_sparse_moe.experts.gate_up_proj.shape) == (E, 2 * ff, h)
    assert tuple(layer.block_sparse_moe.experts.down_proj.shape) == (E, h, ff)
    assert tuple(layer.block_sparse_moe.router.weight.shape) == (E, h)
    assert tuple(layer.shared_mlp.input_linear.weight.shape) == (2 * n_shared * ff, h)
    assert model.config.rope_parameters["rope_theta"] == config.rope_theta
    assert model.config.tie_word_embeddings
    # stacking by hand: expert 3 of layer 1 is [gate; up], n_shared experts' gates come first
    p = "model.layers.1.mlp."
    gate_up = layer_of(model, 1).block_sparse_moe.experts.gate_up_proj[3].detach().numpy()
    np.testing.assert_array_equal(gate_up, np.concatenate(
        [weights[p + "experts.3.gate_proj.weight"], weights[p + "experts.3.up_proj.weight"]]))
    shared_in = layer_of(model, 1).shared_mlp.input_linear.weight.detach().numpy()
    np.testing.assert_array_equal(shared_in[ff * (n_shared - 1): ff * n_shared],
                                  weights[p + f"shared_experts.{n_shared - 1}.gate_proj.weight"])

    engine = ours(path)
    expected = engine.logits(PROMPT)
    got = stock_logits(model)
    assert np.abs(got - expected).max() <= 1e-4
    # upstream's formula (test_torch_parity's token-by-token MiniMind2-MoE) agrees as well
    assert np.abs(got - stock_logits(hf_model(config, weights))).max() <= 1e-4
    assert hf_greedy(model, PROMPT, N_TOKENS) == our_greedy(engine, PROMPT)
    # round trip: our reader splits the Granite layout back, bit for bit
    back = ours(dst)
    assert back.config.n_shared_experts == n_shared and back.config.num_experts_per_tok == 2
    np.testing.assert_array_equal(back.logits(PROMPT), expected)


def layer_of(model, i):
    return model.model.layers[i]


def test_config_json_says_granite(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2-moe", n_shared_experts=2)
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    data = json.loads((dst / "config.json").read_text())
    assert data["model_type"] == "granitemoeshared"
    assert data["architectures"] == ["GraniteMoeSharedForCausalLM"]
    assert (data["num_local_experts"], data["num_experts_per_tok"]) == (4, 2)
    assert data["intermediate_size"] == 192 and data["shared_intermediate_size"] == 384
    assert data["attention_multiplier"] == pytest.approx(1 / 4)  # head_dim 16
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        assert data[name] == 1.0
    assert data["tie_word_embeddings"] is True and data["rope_theta"] == config.rope_theta
    stored = read_safetensors(dst / "model.safetensors")
    assert "lm_head.weight" not in stored and not any(".mlp." in k for k in stored)
    assert "GraniteMoeShared" in (dst / "README.md").read_text()


@pytest.mark.mlx
@pytest.mark.skipif(not HAS_MLX, reason="needs the mlx extra")
def test_granite_folder_round_trips_on_mlx(make_checkpoint, tmp_path):
    path, _, _ = make_checkpoint("minimind2-moe", n_shared_experts=2)
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    expected = ours(path).logits(PROMPT)
    engine = load(dst, backend="mlx", dtype="float32")
    assert engine.config.kind == "minimind2-moe" and engine.config.n_shared_experts == 2
    assert np.abs(engine.logits(PROMPT) - expected).max() <= 1e-4


def test_transformers_own_names_read_back(make_checkpoint, tmp_path):
    """transformers 5 calls the tensors experts.gate_up_proj / experts.down_proj / router.weight."""
    path, _, _ = make_checkpoint("minimind2-moe", n_shared_experts=2)
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    renamed = {k.replace("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj")
                .replace("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj")
                .replace("router.layer.weight", "router.weight"): np.array(v)
               for k, v in read_safetensors(dst / "model.safetensors").items()}
    assert any(k.endswith("experts.gate_up_proj") for k in renamed)
    to_hf.write_safetensors(renamed, dst / "model.safetensors")
    np.testing.assert_array_equal(ours(dst).logits(PROMPT), ours(path).logits(PROMPT))
    # and what transformers itself saves loads back too
    saved = tmp_path / "saved"
    stock(dst).save_pretrained(saved)
    (saved / "tokenizer.json").write_bytes((dst / "tokenizer.json").read_bytes())
    (saved / "tokenizer_config.json").write_bytes((dst / "tokenizer_config.json").read_bytes())
    assert np.abs(ours(saved).logits(PROMPT) - ours(path).logits(PROMPT)).max() <= 1e-6


def test_yarn_and_lora_reach_the_granite_export(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2-moe")
    lora_file = save_lora(lora_state(config), path.parent / "lora" / "x_128.pth")
    ids = list(range(3, 300, 5))
    dst = to_hf.convert(path, tmp_path / "hf", lora=lora_file,
                        overrides={"inference_rope_scaling": True}, progress=False)
    expected = ours(path, lora=lora_file, inference_rope_scaling=True).logits(ids)
    assert np.abs(expected - ours(path, lora=lora_file).logits(ids)).max() > 1e-2  # YaRN matters
    assert np.abs(stock_logits(stock(dst), ids) - expected).max() <= 1e-4


def test_any_source_form(make_checkpoint, tmp_path):
    """A folder in upstream's layout (and a bf16 safetensors file) converts to Granite too."""
    path, _, _ = make_checkpoint("minimind2-moe")
    old = to_hf.convert(path, tmp_path / "old", layout="minimind", progress=False)
    assert json.loads((old / "config.json").read_text())["model_type"] == "minimind"
    dst = to_hf.convert(old, tmp_path / "hf", progress=False)
    np.testing.assert_array_equal(stock_logits(stock(dst)), stock_logits(stock(
        to_hf.convert(path, tmp_path / "direct", progress=False))))
    half = to_hf.convert(dst, tmp_path / "bf16", dtype="bfloat16", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(half)
    assert model.dtype == torch.bfloat16
    assert ours(half).config.kind == "minimind2-moe"


def test_minimind_layout_behind_a_flag(make_checkpoint, tmp_path, capsys):
    path, _, _ = make_checkpoint("minimind2-moe")
    dst = to_hf.convert(path, tmp_path / "hf", layout="minimind", progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "minimind" and config["n_shared_experts"] == 1
    assert "--layout minimind" in (dst / "README.md").read_text()
    np.testing.assert_array_equal(ours(dst).logits(PROMPT), ours(path).logits(PROMPT))
    # the same flag on both command lines
    assert to_hf.main([str(path), str(tmp_path / "cli"), "--layout", "minimind", "--quiet"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "minimind"
    code, _, err = run(capsys, "convert", "--to", "hf", path, tmp_path / "cli2", "--layout", "minimind")
    assert code == 0, err
    assert json.loads((tmp_path / "cli2" / "config.json").read_text())["model_type"] == "minimind"
    code, _, err = run(capsys, "convert", "--to", "mlx", path, tmp_path / "m", "--layout", "minimind")
    assert code == 2  # refused input (the converters' exit code for it)
    assert_one_line_error(err, "--layout is for --to hf")


def test_refusals_write_nothing(make_checkpoint, tmp_path, monkeypatch, capsys):
    import importlib.metadata

    path, _, _ = make_checkpoint("minimind2-moe")
    dense, _, _ = make_checkpoint("minimind2", seed=1)
    with pytest.raises(ValueError, match="unknown layout 'granite'; choose from stock, minimind"):
        to_hf.convert(path, tmp_path / "a", layout="granite", progress=False)
    with pytest.raises(ValueError, match="for MiniMind2-MoE only"):
        to_hf.convert(dense, tmp_path / "a", layout="minimind", progress=False)
    # top-1 without renormalising: each expert weighted by its probability, which Granite's
    # softmax over the top-k cannot express
    with pytest.raises(ValueError, match="cannot express.*layout='minimind'"):
        to_hf.convert(path, tmp_path / "a", overrides={"num_experts_per_tok": 1}, progress=False)
    to_hf.convert(path, tmp_path / "top1", overrides={"num_experts_per_tok": 1}, layout="minimind",
                  progress=False)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "4.48.3" if name == "transformers" else real(name))
    with pytest.raises(ValueError, match=r"\(4\.48\.3\) predates GraniteMoeSharedForCausalLM.*"
                                         r"transformers>=4\.49\.0.*layout='minimind'"):
        to_hf.convert(path, tmp_path / "a", progress=False)
    assert to_hf.main([str(path), str(tmp_path / "a"), "--quiet"]) == 1
    assert "--layout minimind" in capsys.readouterr().err
    to_hf.convert(dense, tmp_path / "dense", progress=False)  # other kinds need no Granite
    for newer in ("4.49.0", "5.0.0rc1"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=newer: v)
        to_hf.convert(path, tmp_path / newer, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("minimind2")) == [
        "4.49.0", "5.0.0rc1", "dense", "top1"]


def test_a_real_granite_model_is_refused(make_checkpoint, tmp_path):
    """Granite releases scale embeddings, residuals and logits: not a MiniMind model."""
    path, _, _ = make_checkpoint("minimind2-moe")
    dst = to_hf.convert(path, tmp_path / "hf", progress=False)
    data = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**data, "embedding_multiplier": 12.0}))
    with pytest.raises(ValueError, match="embedding_multiplier=12.0.*not a MiniMind model"):
        load(dst, backend="torch", device="cpu")
    (dst / "config.json").write_text(json.dumps({**data, "attention_multiplier": 0.0078125}))
    with pytest.raises(ValueError, match="attention_multiplier"):
        load(dst, backend="torch", device="cpu")
