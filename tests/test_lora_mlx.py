"""LoRA on MLX: against the torch backend (an independent implementation), hot-swap and removal,
and mlx_lm adapter folders run by stock ``mlx_lm.load(folder, adapter_path=...)``."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

from conftest import KINDS, tiny_config  # noqa: E402
from test_lora import lora_state, save_lora  # noqa: E402

from converters import merge_lora, to_mlx  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.lora import LoraError  # noqa: E402
from minimind_core.params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.mlx

PROMPT = [1, 5, 77, 200, 31, 9, 302, 17, 88, 3, 250, 11]
STOCK = ["minimind2", "minimind3", "minimind3-moe"]  # kinds whose stock mlx_lm model keeps q_proj (bailing_moe fuses q/k/v)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


def setup(make_checkpoint, kind, seed=1):
    path, config, _ = make_checkpoint(kind)
    lora_file = save_lora(lora_state(config, seed=seed),
                          path.parent / "lora" / f"lora_{seed}_{config.hidden_size}.pth")
    return path, config, lora_file


def engines(path, config, **kw):
    heads = {"num_attention_heads": config.num_attention_heads}  # not in a bare MiniMind2 .pth
    return (load(path, backend="torch", dtype="float32", **heads, **kw),
            load(path, backend="mlx", device="cpu", dtype="float32", **heads, **kw))


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_mlx_lora_matches_torch(kind, merge, make_checkpoint):
    path, config, lora_file = setup(make_checkpoint, kind)
    te, me = engines(path, config, lora=lora_file, merge_lora=merge)
    base = load(path, backend="torch", dtype="float32").logits(PROMPT)
    expected = te.logits(PROMPT)
    assert np.abs(expected - base).max() > 1e-2  # the adapter matters
    assert np.abs(me.logits(PROMPT) - expected).max() <= 1e-3
    assert me.lora_path == str(lora_file) and me.info["lora_merged"] is merge
    a = te.generate(PROMPT, max_new_tokens=12, temperature=0).token_ids
    assert me.generate(PROMPT, max_new_tokens=12, temperature=0).token_ids == a


@pytest.mark.parametrize("merge", [False, True])
def test_hot_swap_and_exact_removal(merge, make_checkpoint):
    path, config, lora_a = setup(make_checkpoint, "minimind3", seed=1)
    lora_b = save_lora(lora_state(config, seed=2), path.parent / "lora" / "b_128.pth")
    _, me = engines(path, config)
    base = me.logits(PROMPT)
    fresh_b = engines(path, config, lora=lora_b, merge_lora=merge)[1].logits(PROMPT)
    me.set_lora(lora_a, merge=merge)
    with_a = me.logits(PROMPT)
    me.set_lora(lora_b, merge=merge)
    np.testing.assert_allclose(me.logits(PROMPT), fresh_b, atol=1e-6, rtol=0)
    assert np.abs(with_a - fresh_b).max() > 1e-2
    me.set_lora(None)
    np.testing.assert_array_equal(me.logits(PROMPT), base)
    assert me.lora_path is None and "lora_merged" not in me.info


@pytest.mark.parametrize("merge", [False, True])
def test_lora_on_a_quantized_model(merge, make_checkpoint):
    path, config, lora_file = setup(make_checkpoint, "minimind2")
    te, _ = engines(path, config, lora=lora_file)
    me = load(path, backend="mlx", device="cpu", dtype="float32", quantize=8, q_group_size=32,
              num_attention_heads=config.num_attention_heads)
    base = me.logits(PROMPT)
    me.set_lora(lora_file, merge=merge)
    # 8-bit weights: close to the fp32 reference, and clearly the adapted model, not the base
    got = me.logits(PROMPT)
    assert np.abs(got - te.logits(PROMPT)).max() < 0.1 < np.abs(got - base).max()
    me.set_lora(None)
    np.testing.assert_array_equal(me.logits(PROMPT), base)


def test_mismatched_lora_leaves_mlx_engine_unchanged(make_checkpoint, tmp_path):
    path, config, lora_file = setup(make_checkpoint, "minimind2")
    other = tiny_config("minimind2", hidden_size=64, head_dim=8)
    bad = save_lora(lora_state(other), tmp_path / "bad_64.pth")
    _, me = engines(path, config, lora=lora_file)
    before = me.logits(PROMPT)
    with pytest.raises(LoraError, match=r"o_proj.*\[64, 64\].*\[128, 128\]"):
        me.set_lora(bad)
    np.testing.assert_array_equal(me.logits(PROMPT), before)
    assert me.lora_path == str(lora_file)


# --- converter: fuse, or an mlx_lm adapter folder ----------------------------------------------

def stock_logits(model, ids=PROMPT):
    out = model(mx.array([ids]))[0].astype(mx.float32)
    return np.array(out)


@pytest.mark.parametrize("kind", STOCK)
def test_adapter_folder_round_trip_through_stock_mlx_lm(kind, make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint(kind)
    # ranks differ per module (mlx_lm has one rank: smaller ones are zero-padded)
    state = lora_state(config, rank=lambda name: 4 if "layers.1." in name else 8)
    lora_file = save_lora(state, tmp_path / "lora.pth")
    dst, adapters = tmp_path / "mlx", tmp_path / "adapters"
    assert to_mlx.main([str(path), str(dst), "--dtype", "float32", "--lora", str(lora_file),
                        "--lora-adapter-out", str(adapters), "--quiet"]) == 0
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == 1.0
    assert cfg["num_layers"] == config.num_hidden_layers
    assert json.loads((dst / "config.json").read_text())["minimind"]["lora"] is None  # not fused

    model, _ = mlx_lm.load(str(dst), adapter_path=str(adapters))
    ours = load(dst, backend="mlx", device="cpu", dtype="float32", lora=lora_file)
    torch_ref = load(path, backend="torch", dtype="float32", lora=lora_file,
                     num_attention_heads=config.num_attention_heads)
    got = stock_logits(model)
    assert np.abs(got - ours.logits(PROMPT)).max() <= 1e-4
    assert np.abs(got - torch_ref.logits(PROMPT)).max() <= 1e-3
    # stock mlx_lm's own greedy loop gives our tokens
    from mlx_lm.generate import generate_step

    stock_tokens = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=10)]
    steps = ours.iter_tokens([PROMPT], SamplingParams(max_new_tokens=10, temperature=0))
    assert [int(next(steps)[0]) for _ in range(10)] == stock_tokens  # eos ignored on both sides
    steps.close()
    # and the folder reads back as a LoRA in minimind-core (torch backend included)
    back = load(path, backend="torch", dtype="float32", lora=adapters,
                num_attention_heads=config.num_attention_heads)
    assert np.abs(back.logits(PROMPT) - torch_ref.logits(PROMPT)).max() <= 1e-5


def test_to_mlx_fuses_then_quantizes(make_checkpoint, tmp_path):
    path, config, lora_file = setup(make_checkpoint, "minimind3")
    fused = to_mlx.convert(path, tmp_path / "fused", dtype="float32", lora=lora_file,
                           progress=False)
    expected = load(path, backend="torch", dtype="float32", lora=lora_file).logits(PROMPT)
    assert np.abs(load(fused, backend="mlx", device="cpu").logits(PROMPT) - expected).max() <= 1e-3
    # quantizing after fusing == quantizing the merged checkpoint
    q = to_mlx.convert(path, tmp_path / "q8", dtype="float32", lora=lora_file, q_bits=8,
                       q_group_size=32, progress=False)
    merged = merge_lora.merge(path, lora_file, path.parent / "merged.safetensors")
    ref = load(merged, backend="mlx", device="cpu", dtype="float32", quantize=8, q_group_size=32)
    np.testing.assert_allclose(load(q, backend="mlx", device="cpu").logits(PROMPT),
                               ref.logits(PROMPT), atol=1e-5, rtol=0)
    assert json.loads((q / "config.json").read_text())["minimind"]["lora"] == str(lora_file)


def test_adapter_out_bad_arguments(make_checkpoint, tmp_path, capsys):
    path, _, lora_file = setup(make_checkpoint, "minimind2")
    assert to_mlx.main([str(path), str(tmp_path / "a"), "--lora-adapter-out",
                        str(tmp_path / "ad"), "--quiet"]) == 2
    assert "needs the adapter" in capsys.readouterr().err
    (tmp_path / "ad").mkdir()
    assert to_mlx.main([str(path), str(tmp_path / "a"), "--lora", str(lora_file),
                        "--lora-adapter-out", str(tmp_path / "ad"), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
