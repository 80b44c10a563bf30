"""``minimind bench``: prefill and decode speed of your model on your backend/device/dtype.

A prompt of ``--prompt-tokens`` random ids is prefilled, then ``--gen-tokens`` tokens are
decoded greedily at batch 1 and at ``--batch N``. The engine's raw token loop
(``Engine.iter_tokens``) is timed directly, so end-of-sequence never cuts a run short and every
row decodes the full budget. A short warm-up run comes first, so one-time costs (cache allocation, kernel choice)
are not counted. For the side-by-side comparison with transformers, see benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..params import SamplingParams
from . import common

if TYPE_CHECKING:
    from ..engine import Engine

FIRST_ID = 3  # skip MiniMind's special ids 0-2 in the random prompts


def time_run(engine: Engine, prompts: list[list[int]], gen_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the next ``gen_tokens - 1`` decode steps)."""
    steps = engine.iter_tokens(prompts, SamplingParams(max_new_tokens=gen_tokens, temperature=0.0))
    try:
        t0 = time.perf_counter()
        next(steps)
        t1 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            next(steps)
        t2 = time.perf_counter()
    finally:
        steps.close()  # releases the engine
    return t1 - t0, t2 - t1


def bench(engine: Engine, batch_sizes: tuple[int, ...] = (1, 8), prompt_tokens: int = 128,
          gen_tokens: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """One row per batch size: prefill tok/s, time to first token, decode tok/s (total, per row)."""
    if prompt_tokens < 1 or gen_tokens < 2:
        raise ValueError("--prompt-tokens must be >= 1 and --gen-tokens >= 2")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    window = engine.config.max_position_embeddings
    if prompt_tokens + gen_tokens > window:
        raise ValueError(f"--prompt-tokens + --gen-tokens = {prompt_tokens + gen_tokens} is more "
                         f"than the model's context window of {window} tokens")
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size

    def prompts(batch: int, length: int) -> list[list[int]]:
        return rng.integers(FIRST_ID, vocab, size=(batch, length)).tolist()

    time_run(engine, prompts(max(batch_sizes), min(prompt_tokens, 16)), 4)  # warm-up
    rows = []
    for batch in batch_sizes:
        prefill, decode = time_run(engine, prompts(batch, prompt_tokens), gen_tokens)
        prefill, decode = max(prefill, 1e-9), max(decode, 1e-9)  # a clock tick is not zero work
        steps = gen_tokens - 1
        rows.append({
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens,
            "prefill_tokens_per_second": batch * prompt_tokens / prefill,
            "time_to_first_token": prefill,
            "decode_tokens_per_second": batch * steps / decode,
            "decode_tokens_per_second_per_sequence": steps / decode,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``bench`` rows (with a weights column when rows carry one)."""
    weights = any("weights" in r for r in rows)
    lines = [("| weights " if weights else "") + "| batch | prompt tokens | prefill tok/s | "
             "time to first token | decode tok/s | decode tok/s per sequence |",
             ("|---" if weights else "") + "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append((f"| {r['weights']} " if weights else "") +
                     f"| {r['batch']} | {r['prompt_tokens']} | {r['prefill_tokens_per_second']:.0f} | "
                     f"{r['time_to_first_token'] * 1000:.1f} ms | {r['decode_tokens_per_second']:.1f} | "
                     f"{r['decode_tokens_per_second_per_sequence']:.1f} |")
    return "\n".join(lines)


def _weights(desc: dict[str, Any]) -> str:
    q = desc.get("quantization")
    return f"int{q['bits']} (group {q['group_size']})" if q else str(desc.get("dtype"))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark")
    g.add_argument("--batch", type=int, default=8, metavar="N",
                   help="the larger batch size measured besides 1 (default 8)")
    g.add_argument("--prompt-tokens", type=int, default=128, metavar="N",
                   help="prompt length in tokens (default 128)")
    g.add_argument("--gen-tokens", type=int, default=64, metavar="N",
                   help="tokens decoded per sequence (default 64)")
    g.add_argument("--seed", type=common.seed, default=0, help="seed of the random prompts")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--quant-rows", action="store_true",
                   help="also load the model quantized to int8 and int4 (--q-bits 8 / 4, group "
                        "--q-group-size or 32) and print their rows next to full precision")
    common.add_model_args(parser)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    engine = common.load_engine(args)
    load_s = time.perf_counter() - t0
    sizes = (1,) if args.batch == 1 else (1, args.batch)
    rows = bench(engine, sizes, args.prompt_tokens, args.gen_tokens, args.seed)
    desc = engine.describe()
    if args.quant_rows:
        for r in rows:
            r["weights"] = _weights(desc)
        for bits in (8, 4):
            quantized = common.load_engine(argparse.Namespace(
                **{**vars(args), "q_bits": bits, "q_group_size": args.q_group_size or 32}))
            for r in bench(quantized, sizes, args.prompt_tokens, args.gen_tokens, args.seed):
                rows.append({**r, "weights": _weights(quantized.describe())})
            del quantized
    if args.json:
        print(json.dumps({"model": desc, "load_seconds": load_s, "results": rows}, default=str))
        return 0
    where = ", ".join(f"{k} {desc[k]}" for k in ("backend", "device", "dtype", "threads", "decode")
                      if desc.get(k))
    print(f"{desc['name']}: {desc['kind']}, {desc['parameters'] / 1e6:.1f}M parameters; {where}; "
          f"loaded in {load_s:.2f} s\n")
    print(format_table(rows))
    return 0
