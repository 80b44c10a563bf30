"""How much int8 / int4 weight quantization changes a model's output: ours, MLX's, llama.cpp's.

Per model (random weights of the released shapes, and the two trained tiny models: the embedded
demo, MiniMind-3 format, and ``tests/data/minimind2-tiny``, MiniMind2 format) and per variant:

- cosine of the last-position logits to float32's (mean and min over the prompts); ours are the
  decode step's logits (the int8/int4 kernels, with int8 activations), MLX's and llama.cpp's
  those of their forward pass over the prompt;
- greedy agreement over ``--new-tokens`` tokens: the mean share of tokens equal to float32's
  before the first difference, and how many prompts give the very same tokens.

The float32 reference is our torch engine in float32 (it matches upstream to 1e-4, and
llama.cpp's f32 export to ~1e-5: ``bench_llama_cpp.py``). Variants: ours ``quantize=8|4``
(group 32 and 64), MLX ``quantize=8|4`` (mlx[cpu] here; a layer whose input width the group
does not divide stays in float, as mlx_lm does: the tiny models' 96-wide inputs at group 64),
and llama.cpp q8_0 / q4_0 (blocks of 32; ``converters.to_gguf``, no weight repacking, f32 KV
cache; its q4_0 is the max / -8 scale ours used before the scale search: the same cosines to
~1e-5), each skipped when its package is missing. Prompts: chat prompts on the
trained models (greetings and held-out arithmetic questions), random ids on random weights.

    python benchmarks/bench_quant_quality.py                       # every model, ~20 min
    python benchmarks/bench_quant_quality.py --models demo minimind2-tiny --no-llama-cpp
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import harness
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
TRAINED = {"demo": None, "minimind2-tiny": ROOT / "tests" / "data" / "minimind2-tiny"}
RANDOM = ("minimind2-small", "minimind2", "minimind-3")
GREETINGS = ("Hello", "Who are you?", "你是谁？", "What is the capital of France?", "谢谢")
GROUPS = (32, 64)


@dataclass
class Model:
    """One model to measure: where it is, the load options it needs, its prompts."""

    name: str
    kind: str
    source: Path
    options: dict
    prompts: list[list[int]]
    tokenizer: Path | None  # for the GGUF export (None: beside the weights)


@dataclass
class Variant:
    """A quantized model, as two functions of a prompt: last-position logits, greedy ids."""

    name: str
    logits: Callable[[list[int]], np.ndarray]
    greedy: Callable[[list[int], int], list[int]]
    note: str = ""


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def agreement(got: list[int], want: list[int]) -> float:
    """Share of ``want`` that ``got`` repeats before their first difference."""
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
             min(len(got), len(want)))
    return n / len(want)


def models(names: list[str], n_prompts: int, threads: int) -> list[Model]:
    """The models asked for, random ones written to temporary files."""
    from demo_corpus import held_out_questions

    from minimind_core import load

    out = []
    for name in names:
        if name in TRAINED:
            path = TRAINED[name]
            engine = load(path, backend="torch", device="cpu", threads=threads)
            source = Path(engine.info["path"])
            questions = [q for q, _ in held_out_questions()]
            asked = list(GREETINGS) + questions[::max(1, len(questions) // n_prompts)]
            prompts = [engine.chat_ids([{"role": "user", "content": q}])
                       for q in asked[:n_prompts]]
            out.append(Model(name, engine.config.kind + " (trained)", source, {}, prompts, None))
        else:
            config = harness.config_for(name)
            rng = np.random.default_rng(3)
            prompts = [rng.integers(3, config.vocab_size, 32).tolist() for _ in range(n_prompts)]
            out.append(Model(name, config.kind + " (random)", harness.write_weights(name),
                             {"tokenizer": harness.tokenizer_dir(),
                              "num_attention_heads": config.num_attention_heads},
                             prompts, harness.tokenizer_dir()))
    return out


def decode_step_logits(engine, ids: list[int]) -> np.ndarray:
    """Our decode step's logits for the token after ``ids``: prefill ``ids[:-1]``, then one
    step with the last id (the int8/int4 kernels run here, not in the prefill)."""
    cache = engine._cache_for(1, len(ids) + 8)
    slot = cache.alloc()
    try:
        engine._prefill(cache, slot, ids[:-1])
        step = engine._decode_step(cache, np.array([slot]), np.array([ids[-1]]))
        return engine._to_numpy(step)[0]
    finally:
        cache.free(slot)


def engine_greedy(engine) -> Callable[[list[int], int], list[int]]:
    return lambda ids, n: [int(r[0]) for r in engine.iter_tokens([ids], max_new_tokens=n)]


def ours(model: Model, bits: int | None, group: int | None, threads: int) -> Variant:
    from minimind_core import load

    engine = load(model.source, backend="torch", device="cpu", dtype="float32", threads=threads,
                  quantize=bits, q_group_size=group, **model.options)
    name = f"ours int{bits} g{group}" if bits else "ours float32"
    return Variant(name, lambda ids: decode_step_logits(engine, ids), engine_greedy(engine))


def mlx(model: Model, bits: int, group: int) -> Variant:
    from minimind_core import load

    engine = load(model.source, backend="mlx", device="cpu", quantize=bits, q_group_size=group,
                  **model.options)
    hidden = engine.config.hidden_size
    note = f"inputs of {hidden} stay float" if hidden % group else ""
    return Variant(f"MLX {bits}-bit g{group}", lambda ids: np.asarray(engine.logits(ids)[-1]),
                   engine_greedy(engine), note)


def llama_cpp(model: Model, outtype: str, folder: Path, threads: int) -> Variant:
    from bench_llama_cpp import llama, llama_greedy, llama_logits

    from converters.to_gguf import convert

    heads = {k: v for k, v in model.options.items() if k == "num_attention_heads"}
    path = convert(model.source, folder / f"{model.name}-{outtype}.gguf", outtype=outtype,
                   tokenizer=model.tokenizer, progress=False, overrides=heads or None)
    llm = llama(path, threads, logits_all=True)
    return Variant(f"llama.cpp {outtype}", lambda ids: llama_logits(llm, ids)[-1],
                   lambda ids, n: llama_greedy(llm, ids, n))


def variants(model: Model, threads: int, tmp: Path, has_mlx: bool,
             has_llama: bool) -> Iterator[Variant]:
    """Each variant, built only when the previous one is measured (one in memory at a time)."""
    for bits in (8, 4):
        for group in GROUPS:
            yield ours(model, bits, group, threads)
    for bits in (8, 4) if has_mlx else ():
        for group in GROUPS:
            yield mlx(model, bits, group)
    for outtype in ("q8_0", "q4_0") if has_llama else ():
        yield llama_cpp(model, outtype, tmp, threads)


def measure(model: Model, variant: Variant, want: list[np.ndarray], greedy: list[list[int]],
            new_tokens: int) -> dict:
    cos = [cosine(variant.logits(ids), w) for ids, w in zip(model.prompts, want, strict=True)]
    got = [variant.greedy(ids, new_tokens) for ids in model.prompts]
    agree = [agreement(g, w) for g, w in zip(got, greedy, strict=True)]
    return {"cos_mean": float(np.mean(cos)), "cos_min": float(np.min(cos)),
            "agree": float(np.mean(agree)), "same": sum(a == 1.0 for a in agree)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=[*RANDOM, *TRAINED],
                   choices=[*RANDOM, *TRAINED])
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts per model (default: 64 on trained models, 8 on random ones: "
                        "fewer leave differences of 1e-3 in the mean cosine to chance)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-mlx", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    has_mlx = not a.no_mlx and importlib.util.find_spec("mlx") is not None
    has_llama = not a.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-quality-") as tmp:
        for name in a.models:
            n = a.prompts or (64 if name in TRAINED else 8)
            (model,) = models([name], n, a.threads)
            ref = ours(model, None, None, a.threads)
            want = [ref.logits(ids) for ids in model.prompts]
            greedy = [ref.greedy(ids, a.new_tokens) for ids in model.prompts]
            del ref
            for variant in variants(model, a.threads, Path(tmp), has_mlx, has_llama):
                r = measure(model, variant, want, greedy, a.new_tokens)
                rows.append(f"| {model.name} | {model.kind} | {variant.name} | "
                            f"{r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['agree']:.1%} | "
                            f"{r['same']}/{len(model.prompts)} | {variant.note} |")
                print(rows[-1], file=sys.stderr, flush=True)
            if model.kind.endswith("(random)"):
                model.source.unlink(missing_ok=True)

    versions = [f"torch {torch.__version__}"]
    if has_mlx:
        import mlx.core as mx

        versions.append(f"mlx {mx.__version__}")
    if has_llama:
        import llama_cpp as lc

        versions.append(f"llama-cpp-python {lc.__version__}")
    print(f"Quantized vs float32 — {platform.machine()}, {a.threads} threads; greedy over "
          f"{a.new_tokens} tokens; {', '.join(versions)}\n")
    print("| model | kind | variant | logits cosine (mean) | (min) | greedy agreement | "
          "identical | note |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
