"""LoRA on the torch backend against independent references.

References: (1) transformers' Llama / Qwen3 / Qwen3-MoE on the base weights with upstream's
``apply_lora`` idea re-done here — every square ``nn.Linear`` gets ``y = W x + B (A x)``; (2) the
formula ``W + B @ A`` computed here in numpy and loaded as a plain checkpoint. LoRA files are built
in upstream's format (``{module}.lora.A.weight`` [r, in], ``{module}.lora.B.weight`` [out, r]).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import save_pth, tiny_config  # noqa: E402
from test_torch_parity import hf_model  # noqa: E402  (the shared transformers reference)

from converters import merge_lora  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.lora import LoraError, read_lora  # noqa: E402

PROMPT = [1, 5, 77, 200, 31, 9, 402, 17, 88, 3, 250, 11]
KINDS = ["minimind2", "minimind3", "minimind2-moe", "minimind3-moe"]


def square_linears(config) -> list[str]:
    """q_proj and o_proj of every layer: the square linears of every tiny kind (hidden = 8 * 16)."""
    return [f"model.layers.{i}.self_attn.{n}" for i in range(config.num_hidden_layers)
            for n in ("q_proj", "o_proj")]


def lora_state(config, seed=1, rank=None, modules=None, dtype=None, prefix=""):
    """An upstream-format LoRA state dict with non-zero B (upstream initialises B to zero)."""
    rng = np.random.default_rng(seed)
    rank = rank or (8 if config.generation == "minimind2" else 16)
    dtype = dtype or (torch.float32 if config.generation == "minimind2" else torch.float16)
    h = config.hidden_size
    state = {}
    for name in modules or square_linears(config):
        r = rank(name) if callable(rank) else rank
        state[f"{prefix}{name}.lora.A.weight"] = torch.from_numpy(
            0.1 * rng.standard_normal((r, h))).to(dtype)
        state[f"{prefix}{name}.lora.B.weight"] = torch.from_numpy(
            0.05 * rng.standard_normal((h, r))).to(dtype)
    return state


def save_lora(state, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def as_numpy(state):
    """{module: (A, B)} in float32, prefixes stripped — what the file holds, read independently."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
        module, part = key.rsplit(".lora.", 1)
        out.setdefault(module, {})[part[0]] = value.float().numpy()
    return {m: (p["A"], p["B"]) for m, p in out.items()}


def merged_weights(weights, state):
    out = dict(weights)
    for module, (a, b) in as_numpy(state).items():
        key = module + ".weight"
        out[key] = (out[key].astype(np.float64) + b.astype(np.float64) @ a.astype(np.float64)
                    ).astype(np.float32)
    return out


def upstream_style(model, state):
    """Upstream's apply_lora + load_lora on a transformers model: every square nn.Linear gets
    forward(x) = linear(x) + B(A(x)); every such module must have its tensors (strict)."""
    parts = as_numpy(state)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.weight.shape[0] == module.weight.shape[1]:
            a, b = (torch.from_numpy(t) for t in parts.pop(name))
            module.forward = (lambda x, f=module.forward, a=a, b=b:
                              f(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b))
    assert not parts, f"LoRA modules the model has no square linear for: {list(parts)}"
    return model


def torch_engine(path, **kw):
    return load(path, backend="torch", device="cpu", dtype="float32", **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_merged_and_formula_agree(kind, make_checkpoint, tmp_path):
    path, config, weights = make_checkpoint(kind)
    state = lora_state(config)
    lora_file = save_lora(state, path.parent / "lora" / f"lora_identity_{config.hidden_size}.pth")

    ref_model = upstream_style(hf_model(config, weights), state)
    with torch.no_grad():
        reference = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    formula = torch_engine(save_pth(merged_weights(weights, state), tmp_path / "f.pth"),
                           tokenizer=path.parent.parent / "model").logits(PROMPT)
    base = torch_engine(path).logits(PROMPT)
    unmerged = torch_engine(path, lora=lora_file)
    merged = torch_engine(path, lora=lora_file, merge_lora=True)

    assert np.abs(reference - base).max() > 1e-2  # the adapter matters at this size
    assert np.abs(formula - reference).max() <= 1e-4
    assert np.abs(unmerged.logits(PROMPT) - reference).max() <= 1e-4
    assert np.abs(merged.logits(PROMPT) - reference).max() <= 1e-4
    assert unmerged.lora_path == merged.lora_path == str(lora_file)
    assert unmerged.describe()["lora"] == str(lora_file)
    # the cached prefill/decode path sees the adapter too
    a = unmerged.generate(PROMPT, max_new_tokens=8, temperature=0)
    b = merged.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("merge", [False, True])
def test_set_lora_none_restores_base_exactly(merge, make_checkpoint):
    path, config, _ = make_checkpoint("minimind3")
    lora_file = save_lora(lora_state(config), path.parent / "lora" / "x_128.pth")
    engine = torch_engine(path)
    base = engine.logits(PROMPT)
    base_tokens = engine.generate(PROMPT, max_new_tokens=10, temperature=0).token_ids
    fused = [layer.self_attn.wqkv.clone() for layer in engine.model.model.layers]
    o_proj = [layer.self_attn.o_proj.weight.clone() for layer in engine.model.model.layers]

    engine.set_lora(lora_file, merge=merge)
    assert np.abs(engine.logits(PROMPT) - base).max() > 1e-2
    if merge:  # the merge went through the q_proj view into the fused wqkv
        assert not torch.equal(engine.model.model.layers[0].self_attn.wqkv, fused[0])
    engine.set_lora(None)

    np.testing.assert_array_equal(engine.logits(PROMPT), base)
    assert engine.generate(PROMPT, max_new_tokens=10, temperature=0).token_ids == base_tokens
    for layer, wqkv, o in zip(engine.model.model.layers, fused, o_proj, strict=True):
        assert torch.equal(layer.self_attn.wqkv, wqkv) and torch.equal(layer.self_attn.o_proj.weight, o)
        assert layer.self_attn.lora == {}
    assert engine.lora_path is None


@pytest.mark.parametrize("merge", [False, True])
def test_hot_swap_a_b_none(merge, make_checkpoint):
    path, config, _ = make_checkpoint("minimind2")
    lora_a = save_lora(lora_state(config, seed=1), path.parent / "lora" / "a_128.pth")
    lora_b = save_lora(lora_state(config, seed=2), path.parent / "lora" / "b_128.pth")
    engine = torch_engine(path)
    base = engine.logits(PROMPT)
    fresh_a = torch_engine(path, lora=lora_a, merge_lora=merge).logits(PROMPT)
    fresh_b = torch_engine(path, lora=lora_b, merge_lora=merge).logits(PROMPT)
    assert np.abs(fresh_a - fresh_b).max() > 1e-2

    engine.set_lora(lora_a, merge=merge)
    np.testing.assert_allclose(engine.logits(PROMPT), fresh_a, atol=1e-6, rtol=0)
    engine.set_lora(lora_b, merge=merge)  # swap without reloading: A is gone, only B is applied
    np.testing.assert_allclose(engine.logits(PROMPT), fresh_b, atol=1e-6, rtol=0)
    assert engine.lora_path == str(lora_b)
    engine.set_lora(None)
    np.testing.assert_array_equal(engine.logits(PROMPT), base)


def test_prefixes_fp16_and_per_module_ranks(make_checkpoint, tmp_path):
    path, config, weights = make_checkpoint("minimind3")
    state = lora_state(config, rank=lambda name: 4 if "layers.0." in name else 16,
                       dtype=torch.float16, prefix="module._orig_mod.")
    lora_file = save_lora(state, tmp_path / "lora.pth")
    lora = read_lora(lora_file)
    assert lora.file_dtype == "float16"
    assert lora.ranks["model.layers.0.self_attn.q_proj"] == 4
    assert lora.ranks["model.layers.1.self_attn.o_proj"] == 16
    formula = torch_engine(save_pth(merged_weights(weights, state), tmp_path / "f.pth"),
                           tokenizer=path.parent.parent / "model").logits(PROMPT)
    got = torch_engine(path, lora=lora_file).logits(PROMPT)
    assert np.abs(got - formula).max() <= 1e-4


def test_safetensors_lora_file(make_checkpoint, tmp_path):
    from safetensors.torch import save_file

    path, config, weights = make_checkpoint("minimind2")
    state = lora_state(config)
    save_file(state, tmp_path / "lora.safetensors")
    formula = torch_engine(save_pth(merged_weights(weights, state), tmp_path / "f.pth"),
                           tokenizer=path.parent.parent / "model").logits(PROMPT)
    got = torch_engine(path, lora=tmp_path / "lora.safetensors").logits(PROMPT)
    assert np.abs(got - formula).max() <= 1e-4



@pytest.mark.parametrize("generation,hidden,layers,moe", [
    ("minimind2", 512, 8, False), ("minimind2", 768, 16, False), ("minimind2", 640, 8, True),
    ("minimind3", 768, 8, False), ("minimind3", 768, 8, True)])
def test_square_linears_of_the_released_models_are_q_and_o(generation, hidden, layers, moe):
    """FORMATS.md: in every release upstream's apply_lora hits exactly q_proj and o_proj."""
    from minimind_core.config import ModelConfig
    from minimind_core.lora import square_modules

    config = ModelConfig.for_generation(generation, hidden, layers, use_moe=moe)
    assert sorted(square_modules(config)) == sorted(square_linears(config))

# --- mismatches: one message naming the first bad module and both shapes ---------------------

def test_lora_for_another_hidden_size(make_checkpoint, tmp_path):
    path, _, _ = make_checkpoint("minimind2")
    other = tiny_config("minimind2", hidden_size=64, head_dim=8)
    lora_file = save_lora(lora_state(other), tmp_path / "lora_x_64.pth")
    with pytest.raises(LoraError) as err:
        torch_engine(path, lora=lora_file)
    msg = str(err.value)
    assert "model.layers.0.self_attn.o_proj" in msg  # the first module in file order
    assert "[64, 64]" in msg and "[128, 128]" in msg


def test_lora_for_another_generation(make_checkpoint, tmp_path):
    # MiniMind2-768 (16 layers) vs MiniMind-3-768 (8 layers): same widths, other depth
    path, _, _ = make_checkpoint("minimind3")
    other = tiny_config("minimind2", num_hidden_layers=4)
    lora_file = save_lora(lora_state(other), tmp_path / "lora_x_128.pth")
    with pytest.raises(LoraError, match=r"model\.layers\.2\.self_attn\.o_proj .*does not exist"):
        torch_engine(path, lora=lora_file)


def test_lora_on_a_non_square_module(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    kv = config.num_key_value_heads * config.head_dim
    state = {"model.layers.0.self_attn.k_proj.lora.A.weight": torch.randn(8, config.hidden_size),
             "model.layers.0.self_attn.k_proj.lora.B.weight": torch.randn(kv, 8)}
    with pytest.raises(LoraError, match=r"k_proj is not square \(\[32, 128\]\)"):
        torch_engine(path, lora=save_lora(state, tmp_path / "k.pth"))


def test_bad_lora_files(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    with pytest.raises(LoraError, match="not a LoRA file"):
        read_lora(path)  # a base model passed as the adapter
    state = lora_state(config)
    state.pop("model.layers.1.self_attn.q_proj.lora.B.weight")
    with pytest.raises(LoraError, match=r"model\.layers\.1\.self_attn\.q_proj has no .*lora\.B"):
        read_lora(save_lora(state, tmp_path / "half.pth"))
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        read_lora(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="LoRA adapter, not a base model"):
        torch_engine(save_lora(lora_state(config), tmp_path / "l.pth"))


def test_failed_set_lora_leaves_engine_as_it_was(make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind2")
    good = save_lora(lora_state(config), tmp_path / "good.pth")
    bad = save_lora(lora_state(tiny_config("minimind2", hidden_size=64, head_dim=8)),
                    tmp_path / "bad.pth")
    for merge in (False, True):
        engine = torch_engine(path, lora=good, merge_lora=merge)
        before = engine.logits(PROMPT)
        with pytest.raises(LoraError):
            engine.set_lora(bad, merge=merge)
        np.testing.assert_array_equal(engine.logits(PROMPT), before)
        assert engine.lora_path == str(good)


# --- merge_lora converter -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["merged.safetensors", "merged.pth", "merged_hf"])
def test_merge_lora_output_loads_without_adapter(name, make_checkpoint):
    path, config, _ = make_checkpoint("minimind3-moe")
    lora_file = save_lora(lora_state(config), path.parent / "lora" / "x_128.pth")
    expected = torch_engine(path, lora=lora_file).logits(PROMPT)
    dst = path.parent / name
    assert merge_lora.main([str(path), str(lora_file), str(dst)]) == 0
    engine = torch_engine(dst)
    assert engine.config.kind == "minimind3-moe" and engine.lora_path is None
    assert np.abs(engine.logits(PROMPT) - expected).max() <= 1e-4


def test_merge_lora_refuses_bad_input(make_checkpoint, tmp_path, capsys):
    path, config, _ = make_checkpoint("minimind2")
    good = save_lora(lora_state(config), tmp_path / "good.pth")
    dst = tmp_path / "merged.safetensors"
    dst.write_bytes(b"keep me")
    assert merge_lora.main([str(path), str(good), str(dst)]) == 2
    assert "exists" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    bad = save_lora(lora_state(tiny_config("minimind2", hidden_size=64, head_dim=8)),
                    tmp_path / "bad.pth")
    assert merge_lora.main([str(path), str(bad), str(tmp_path / "m2.safetensors")]) == 2
    assert "[64, 64]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["bad.pth", "good.pth",
                                                            "merged.safetensors"]  # no temp left
    with pytest.raises(ValueError, match="unknown output type"):
        merge_lora.merge(path, good, tmp_path / "m.gguf")
    merge_lora.merge(path, good, dst, force=True)
    assert dst.read_bytes() != b"keep me"



@pytest.mark.cuda
def test_adapter_swaps_reach_cuda_graph_decoding(make_checkpoint):
    """On CUDA the decode step replays a captured graph: every swap must be seen there too."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path, config, _ = make_checkpoint("minimind3")
    a = save_lora(lora_state(config, seed=1), path.parent / "lora" / "a_128.pth")
    b = save_lora(lora_state(config, seed=2), path.parent / "lora" / "b_128.pth")

    def tokens(engine):
        return engine.generate(PROMPT, max_new_tokens=16, temperature=0).token_ids

    def fresh(lora, merge):
        return tokens(load(path, backend="torch", device="cuda", dtype="float32", lora=lora,
                           merge_lora=merge))

    engine = load(path, backend="torch", device="cuda", dtype="float32")
    assert engine.info["decode"] == "graph"
    for lora, merge in [(None, False), (a, False), (b, False), (a, True), (b, True), (None, False)]:
        engine.set_lora(lora, merge=merge)
        assert tokens(engine) == fresh(lora, merge), (lora, merge)
