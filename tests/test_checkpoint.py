"""Every checkpoint form loads to the same model, and every bad input gets one clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import random_weights, save_pth, tiny_config  # noqa: E402

from minimind_core import load  # noqa: E402
from minimind_core.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from minimind_core.config import MINIMIND2, MINIMIND3, infer_config  # noqa: E402

IDS = [1, 40, 41, 42, 300, 7]


def reference_logits(path):
    return load(path, backend="torch", device="cpu", dtype="float32").logits(IDS)


def test_config_inferred_from_shapes(make_checkpoint):
    for kind in ("minimind2", "minimind2-moe", "minimind3", "minimind3-moe"):
        path, config, _ = make_checkpoint(kind)
        got = load_checkpoint(path).config
        for field in ("generation", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                      "num_experts", "n_shared_experts", "num_experts_per_tok", "rms_norm_eps"):
            assert getattr(got, field) == getattr(config, field), (kind, field)


def test_generation_defaults_when_nothing_says_otherwise(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2-moe")
    c = load_checkpoint(path).config
    assert (c.generation, c.rms_norm_eps, c.num_experts_per_tok) == (MINIMIND2, 1e-5, 2)
    path, _, _ = make_checkpoint("minimind3-moe")
    c = load_checkpoint(path).config
    assert (c.generation, c.rms_norm_eps, c.num_experts_per_tok) == (MINIMIND3, 1e-6, 1)


def test_config_json_beside_weights_and_overrides(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2-moe")
    (path.parent / "config.json").write_text(json.dumps(
        {"model_type": "minimind", "num_experts_per_tok": 1, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0}))
    c = load_checkpoint(path).config
    assert (c.num_experts_per_tok, c.rms_norm_eps, c.rope_theta) == (1, 1e-6, 10000.0)
    c = load_checkpoint(path, num_experts_per_tok=3, inference_rope_scaling=True).config
    assert c.num_experts_per_tok == 3 and c.yarn["factor"] == 16


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_keys_are_stripped(prefix, make_checkpoint):
    path, _, weights = make_checkpoint("minimind3")
    state = torch.load(path, weights_only=True)
    torch.save({prefix + k: v for k, v in state.items()}, path.with_name("p.pth"))
    np.testing.assert_array_equal(reference_logits(path.with_name("p.pth")), reference_logits(path))


def test_tied_head_stored_once_either_way(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    state = torch.load(path, weights_only=True)
    emb_only = {k: v for k, v in state.items() if k != "lm_head.weight"}
    torch.save(emb_only, path.with_name("a.pth"))
    head_only = {k: v for k, v in state.items() if k != "model.embed_tokens.weight"}
    torch.save(head_only, path.with_name("b.pth"))
    ref = reference_logits(path)
    np.testing.assert_array_equal(reference_logits(path.with_name("a.pth")), ref)
    np.testing.assert_array_equal(reference_logits(path.with_name("b.pth")), ref)


def test_safetensors_bf16_and_hf_folders(make_checkpoint):
    from safetensors.torch import save_file

    path, config, weights = make_checkpoint("minimind3-moe")
    ref = reference_logits(path)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    st = path.with_suffix(".safetensors")
    save_file(state, st)
    np.testing.assert_array_equal(reference_logits(st), ref)
    # bf16 file: read back exactly as torch rounds it
    save_file({k: v.bfloat16() for k, v in state.items()}, path.with_name("bf16.safetensors"))
    ck = load_checkpoint(path.with_name("bf16.safetensors"))
    assert ck.file_dtype == "bfloat16"
    np.testing.assert_array_equal(ck.weights["model.norm.weight"],
                                  state["model.norm.weight"].bfloat16().float().numpy())
    # transformers folder, sharded with an index, and pytorch_model.bin
    folder = path.parent.parent / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe",
                                                    "num_experts_per_tok": 1}))
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k] for k in keys[:half]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[half:]}, folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors"
                            for i, k in enumerate(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(load(folder, backend="torch", tokenizer=path.parent.parent / "model",
                                       dtype="float32").logits(IDS), ref)
    binf = path.parent.parent / "bin"
    binf.mkdir()
    torch.save(state, binf / "pytorch_model.bin")
    np.testing.assert_array_equal(load(binf, backend="torch", tokenizer=path.parent.parent / "model",
                                       dtype="float32").logits(IDS), ref)


def test_stacked_experts_are_unstacked(make_checkpoint):
    """mlx_lm's switch_mlp and transformers 5's fused gate_up_proj hold the same experts."""
    from safetensors.torch import save_file

    path, config, weights = make_checkpoint("minimind3-moe")
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    fused = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        for n in ("gate", "up", "down"):
            fused[f"{p}.switch_mlp.{n}_proj.weight"] = torch.stack(
                [state[f"{p}.experts.{e}.{n}_proj.weight"] for e in range(config.num_experts)])
    save_file(fused, path.with_name("stacked.safetensors"))
    np.testing.assert_array_equal(reference_logits(path.with_name("stacked.safetensors")),
                                  reference_logits(path))


# --- bad inputs ----------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


def test_optimizer_state_is_named(tmp_path):
    p = tmp_path / "opt.pth"
    torch.save({"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3}]}, p)
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_checkpoint(p)


def test_random_pickle_is_refused(tmp_path):
    import pickle

    p = tmp_path / "evil.pth"
    p.write_bytes(pickle.dumps({"a": object()}))
    with pytest.raises(CheckpointError, match="not a plain PyTorch state dict|truncated or corrupt"):
        load_checkpoint(p)


def test_truncated_files(make_checkpoint):
    from safetensors.torch import save_file

    path, _, weights = make_checkpoint("minimind2")
    data = path.read_bytes()
    cut = path.with_name("cut.pth")
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)
    st = path.with_suffix(".safetensors")
    save_file({k: torch.from_numpy(v.copy()) for k, v in weights.items()}, st)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(st)


def test_missing_and_unexpected_keys_are_listed(make_checkpoint):
    path, _, weights = make_checkpoint("minimind2")
    broken = dict(weights)
    del broken["model.layers.1.mlp.down_proj.weight"]
    broken["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_pth(broken, path.with_name("broken.pth"))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), e.g. model.layers.1.mlp.down_proj"
                                              r".*1 unexpected key\(s\), e.g. model.layers.0.extra"):
        load_checkpoint(path.with_name("broken.pth"))


def test_lora_file_passed_as_model(tmp_path):
    p = tmp_path / "lora_identity_128.pth"
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(8, 128)}, p)
    with pytest.raises(CheckpointError, match="LoRA adapter.*lora="):
        load_checkpoint(p)


def test_override_contradicting_shapes(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    with pytest.raises(ValueError, match="hidden_size=512 contradicts the checkpoint.*hidden_size=128"):
        load_checkpoint(path, hidden_size=512)
    with pytest.raises(ValueError, match="unknown model setting 'hiden_size'"):
        load_checkpoint(path, hiden_size=128)
    with pytest.raises(ValueError, match="num_attention_heads=7 does not divide"):
        load_checkpoint(path, num_attention_heads=7)


def test_not_a_minimind_model():
    with pytest.raises(ValueError, match="not a MiniMind model"):
        infer_config({"encoder.weight": (3, 4)})


def test_unknown_backend_and_dtype(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose from \['torch', 'mlx', 'auto'\]"):
        load(path, backend="tpu")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load(path, backend="torch", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load(path, backend="torch", device="cuda")


def test_params_count_matches_tensors(make_checkpoint):
    for kind in ("minimind2", "minimind2-moe", "minimind3", "minimind3-moe"):
        path, config, weights = make_checkpoint(kind)
        assert config.num_parameters() == sum(v.size for v in weights.values())
        assert tiny_config(kind).kind == kind
        assert random_weights(config).keys() == weights.keys()


def test_yarn_block_in_config_json_switches_yarn_on(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    (path.parent / "config.json").write_text(json.dumps(
        {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 16,
                                                 "original_max_position_embeddings": 2048}}))
    c = load_checkpoint(path).config
    assert c.inference_rope_scaling and c.yarn["factor"] == 16 and c.yarn["beta_fast"] == 32
    (path.parent / "config.json").write_text(json.dumps({"model_type": "llama",
                                                         "rope_scaling": None}))
    assert load_checkpoint(path).config.yarn is None


@pytest.mark.parametrize("override,match", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok must be an integer from 1 to num_experts=4"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be an integer from 1"),
    ({"num_experts_per_tok": "two"}, "num_experts_per_tok must be an integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": 0}, "rope_theta must be a positive number"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling must be upstream's YaRN"),
])
def test_bad_overrides_are_named(override, match, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3-moe")
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, **override)


def test_rope_scaling_override_switches_yarn_on(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    c = load_checkpoint(path, rope_scaling={"type": "yarn", "factor": 8}).config
    assert c.inference_rope_scaling and c.yarn["factor"] == 8
    assert load_checkpoint(path, rope_scaling={"type": "yarn", "factor": 8},
                           inference_rope_scaling=False).config.yarn is None


def test_folder_with_several_checkpoints_is_an_error(make_checkpoint):
    path, _, weights = make_checkpoint("minimind3")
    save_pth(random_weights(tiny_config("minimind3"), seed=5), path.with_name("pretrain_128.pth"))
    with pytest.raises(CheckpointError, match=r"holds several checkpoints \(full_sft_128.pth, "
                                              r"pretrain_128.pth\); pass the file"):
        load_checkpoint(path.parent)


def test_legacy_non_zip_pth_loads(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    state = torch.load(path, weights_only=True)
    legacy = path.with_name("legacy.pth")
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(reference_logits(legacy), reference_logits(path))


def test_state_dict_saved_with_lora_layers_is_merged(make_checkpoint):
    path, config, weights = make_checkpoint("minimind2")
    rng = np.random.default_rng(3)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    merged = dict(weights)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        a = (0.05 * rng.standard_normal((8, 128))).astype(np.float32)
        b = (0.05 * rng.standard_normal((128, 8))).astype(np.float32)
        state[f"{name}.lora.A.weight"], state[f"{name}.lora.B.weight"] = map(torch.from_numpy, (a, b))
        merged[f"{name}.weight"] = weights[f"{name}.weight"] + b @ a  # FORMATS.md: W' = W + B A
    torch.save(state, path.with_name("with_lora.pth"))
    save_pth(merged, path.with_name("merged.pth"))
    got = reference_logits(path.with_name("with_lora.pth"))
    np.testing.assert_allclose(got, reference_logits(path.with_name("merged.pth")), atol=1e-5)
    assert np.abs(got - reference_logits(path)).max() > 1e-3  # the LoRA really changed something


def test_garbage_file_is_called_corrupt(tmp_path):
    p = tmp_path / "full_sft_512.pth"
    p.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch file, or truncated/corrupt"):
        load_checkpoint(p)
