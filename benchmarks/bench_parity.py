"""Parity at the five released shapes (random weights of the real sizes), fp32:

- TorchEngine vs transformers (LlamaForCausalLM / GraniteMoeSharedForCausalLM / Qwen3ForCausalLM
  / Qwen3MoeForCausalLM loaded from our to_hf export): max |logit difference| over a 64-token
  prompt and the 24 greedy tokens;
- MlxEngine vs TorchEngine on the same file, and stock mlx_lm (its own model class for the
  model_type our to_mlx writes: llama, bailing_moe, qwen3, qwen3_moe) vs TorchEngine (when mlx
  is installed);
- a random upstream-style LoRA (q_proj and o_proj, rank 8 for MiniMind2 / 16 for MiniMind-3):
  unmerged vs merged on torch, torch vs MLX unmerged, and set_lora(None) back to the base.

    python benchmarks/bench_parity.py [--shapes minimind2-small minimind-3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import numpy as np

N_TOKENS = 24


def greedy(engine, ids: list[int]) -> list[int]:
    from minimind_core.params import SamplingParams

    steps = engine.iter_tokens([ids], SamplingParams(max_new_tokens=N_TOKENS))
    tokens = [int(next(steps)[0]) for _ in range(N_TOKENS)]
    steps.close()
    return tokens


def stock_mlx_cell(path, tok, ids: list[int], logits: np.ndarray, tokens: list[int]) -> str:
    """Stock mlx_lm on our to_mlx export (fp32): max |Δlogit| vs TorchEngine / greedy tokens."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    from converters.to_mlx import convert as to_mlx

    folder = to_mlx(path, Path(tempfile.mkdtemp()) / "mlx", dtype="float32", tokenizer=tok,
                    progress=False)
    model, _ = mlx_lm.load(str(folder))
    d = np.abs(np.array(model(mx.array([ids]))[0]) - logits).max()
    steps = generate_step(mx.array(ids), model, max_tokens=N_TOKENS,
                          sampler=lambda x: mx.argmax(x, -1))
    same = [int(t) for t, _ in steps] == tokens
    return f"{d:.1e} / {'same' if same else 'DIFFERENT'} ({model.model_type})"


def random_lora(config, seed: int = 0):
    """An upstream-format LoRA on every square linear (q_proj, o_proj) with non-zero B."""
    from minimind_core.lora import LoRA, square_modules

    rank = 8 if config.generation == "minimind2" else 16
    rng = np.random.default_rng(seed)
    h = config.hidden_size
    return LoRA({name: ((0.02 * rng.standard_normal((rank, h))).astype(np.float32),
                        (0.02 * rng.standard_normal((h, rank))).astype(np.float32))
                 for name in square_modules(config)})


def lora_row(path, tok, ids: list[int], base: np.ndarray, has_mlx: bool) -> str:
    from minimind_core import load

    engine = load(path, backend="torch", device="cpu", dtype="float32", tokenizer=tok)
    lora = random_lora(engine.config)
    engine.set_lora(lora)
    unmerged = engine.logits(ids)
    engine.set_lora(lora, merge=True)
    merged = engine.logits(ids)
    engine.set_lora(None)
    restored = np.array_equal(engine.logits(ids), base)
    cells = [f"{np.abs(unmerged - merged).max():.1e}"]
    if has_mlx:
        mlx = load(path, backend="mlx", device="cpu", dtype="float32", tokenizer=tok)
        mlx.set_lora(lora)
        cells.append(f"{np.abs(mlx.logits(ids) - unmerged).max():.1e}")
    else:
        cells.append("mlx not installed")
    cells.append("exact" if restored else "DIFFERENT")
    return " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(harness.SHAPES), choices=list(harness.SHAPES))
    a = p.parse_args()
    import importlib.util

    import torch
    import transformers

    from converters.to_hf import convert
    from minimind_core import load

    torch.manual_seed(0)
    rows = []
    for shape in a.shapes:
        path = harness.write_weights(shape)
        tok = harness.tokenizer_dir()
        ids = np.random.default_rng(0).integers(3, 6400, 64).tolist()
        ours = load(path, backend="torch", device="cpu", dtype="float32", tokenizer=tok)
        logits, tokens = ours.logits(ids), greedy(ours, ids)
        row = {"shape": shape, "kind": ours.config.kind}
        folder = convert(path, Path(tempfile.mkdtemp()) / "hf", tokenizer=tok, progress=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
            out = hf.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        row["hf"] = (f"{np.abs(logits - ref).max():.1e} / {'same' if out == tokens else 'DIFFERENT'}"
                     f" ({type(hf).__name__})")
        has_mlx = importlib.util.find_spec("mlx") is not None
        row["lora"] = lora_row(path, tok, ids, logits, has_mlx)
        if has_mlx:
            mlx = load(path, backend="mlx", device="cpu", dtype="float32", tokenizer=tok)
            d = np.abs(mlx.logits(ids) - logits).max()
            row["mlx"] = f"{d:.1e} / {'same' if greedy(mlx, ids) == tokens else 'DIFFERENT'}"
            row["stock_mlx"] = stock_mlx_cell(path, tok, ids, logits, tokens)
        else:
            row["mlx"] = row["stock_mlx"] = "mlx not installed"
        rows.append(row)
        print(f"  measured {shape}", flush=True)
    print(f"\nfp32 parity, 64-token prompt, {N_TOKENS} greedy tokens (max |Δlogit| / tokens)\n")
    print("| shape | kind | TorchEngine vs transformers | MlxEngine vs TorchEngine | stock mlx_lm "
          "vs TorchEngine | LoRA: unmerged vs merged | LoRA: MLX vs torch | LoRA removed → base |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['kind']} | {r['hf']} | {r['mlx']} | {r['stock_mlx']} | "
              f"{r['lora']} |")


if __name__ == "__main__":
    main()
