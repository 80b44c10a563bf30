"""Weight-only int8 / int4 matmuls (backends/torch/quant.py) against float32 torch.mm on CPU.

For each layer a decode step multiplies (the fused q/k/v and gate/up products, o, down, the
head) of minimind2-small and minimind-3: µs per call and GB/s of weight read for float32
``torch.mm(x, W.t(), out=)`` (what the native decode step calls), torch's own
``_weight_int8pack_mm`` (per-channel int8, what gpt-fast uses; reference only), and our int8 and
int4 kernels called the way a decode step would (``QuantWeight.bind``: buffers fixed). The last
rows per model add one token's products (every layer, 8 of each, and the head).

The machine may be shared: every implementation is timed in interleaved blocks, repeated, and
the medians and ratios come from this one run. Threads are the same for all columns.

    python benchmarks/bench_quant_matmul.py                       # batch 1 and 16, 1 and 2 threads
    python benchmarks/bench_quant_matmul.py --group 64 --repeats 11
    MINIMIND_QKERNEL=avx2 python benchmarks/bench_quant_matmul.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backends.torch import quant  # noqa: E402
from minimind_core.config import ModelConfig  # noqa: E402

MODELS = {"minimind2-small": ("minimind2", 512), "minimind3": ("minimind3", 768)}
IMPLS = ("fp32", "int8pack", "int8", "int4")


def layers(model: str) -> list[tuple[str, int, int, int]]:
    """(layer, in, out, count per token) of one decode step, as the native step fuses them."""
    cfg = ModelConfig.for_generation(*MODELS[model], 8)
    h, d, n = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return [("qkv", h, qkv, n), ("o", cfg.num_attention_heads * d, h, n),
            ("gate+up", h, 2 * cfg.intermediate_size, n), ("down", cfg.intermediate_size, h, n),
            ("head", h, cfg.vocab_size, 1)]


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def make_calls(w: torch.Tensor, x: torch.Tensor, threads: int, group: int) -> dict:
    """Each implementation as a call without arguments on fixed buffers, and its bytes read."""
    wt, y = w.t(), torch.empty(x.shape[0], w.shape[0])
    w8, s8 = per_channel_int8(w)
    q8, q4 = quant.quantize_weight(w, 8, group), quant.quantize_weight(w, 4, group)
    return {
        "fp32": (lambda: torch.mm(x, wt, out=y), w.numel() * 4),
        "int8pack": (lambda: torch._weight_int8pack_mm(x, w8, s8), w8.numel() + s8.numel() * 4),
        "int8": (q8.bind(x, torch.empty_like(y), threads=threads), q8.nbytes),
        "int4": (q4.bind(x, torch.empty_like(y), threads=threads), q4.nbytes),
    }


def sequence(calls: list) -> callable:
    def run() -> None:
        for c in calls:
            c()
    return run


def time_block(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def measure(fns: dict, repeats: int, block_s: float) -> dict[str, float]:
    """Median seconds per call of each function, blocks interleaved (order rotated)."""
    counts = {}
    for name, fn in fns.items():
        fn()
        counts[name] = max(2, int(block_s / max(time_block(fn, 2), 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_block(fns[name], counts[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def bench_model(model: str, batch: int, threads: int, a: argparse.Namespace) -> None:
    """One row per layer (cycling through its 8 layers' weights, so that none sits in L2 as a
    single repeated matrix would) and one for a whole token's products in decode order."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    impls = [k for k in IMPLS if k != "int8pack" or a.int8pack]
    per_layer, token = {}, {impl: [] for impl in impls}
    for name, i, o, count in layers(model):
        x = torch.randn(batch, i, generator=gen)
        copies = [make_calls(torch.randn(o, i, generator=gen) * 0.02, x, threads, a.group)
                  for _ in range(max(count, a.copies))]
        per_layer[name] = (i, o, copies)
        for impl in impls:
            token[impl].append([c[impl][0] for c in copies[:count]])
    for name, (i, o, copies) in per_layer.items():
        t = measure({impl: sequence([c[impl][0] for c in copies]) for impl in impls},
                    a.repeats, a.block_ms / 1e3)
        t = {impl: v / len(copies) for impl, v in t.items()}
        gbs = {k: copies[0][k][1] / t[k] / 1e9 for k in ("fp32", "int8", "int4")}
        print(row([model, name, f"{i}→{o}", batch, threads,
                   *(f"{t[k] * 1e6:.1f}" if k in t else "–" for k in IMPLS),
                   f"{t['fp32'] / t['int8']:.2f}", f"{t['fp32'] / t['int4']:.2f}",
                   *(f"{gbs[k]:.1f}" for k in ("fp32", "int8", "int4"))]), flush=True)
    n = len(token["fp32"][0])  # layers: qkv, o, gate+up, down of each, then the head
    steps = {impl: sequence([c for layer in range(n) for c in (token[impl][0][layer],
                             token[impl][1][layer], token[impl][2][layer],
                             token[impl][3][layer])] + token[impl][4]) for impl in impls}
    t = measure(steps, a.repeats, 2 * a.block_ms / 1e3)
    print(row([model, "**one token**", f"{n} layers + head", batch, threads,
               *(f"**{t[k] * 1e6:.0f}**" if k in t else "–" for k in IMPLS),
               f"**{t['fp32'] / t['int8']:.2f}**", f"**{t['fp32'] / t['int4']:.2f}**",
               "", "", ""]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--group", type=int, default=32, choices=quant.GROUP_SIZES,
                    help="int8/int4 group size (32: llama.cpp's q8_0/q4_0 blocks)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-ms", type=float, default=20.0, help="time per timed block")
    ap.add_argument("--no-int8pack", dest="int8pack", action="store_false",
                    help="leave out torch._weight_int8pack_mm (slow at batch 16)")
    ap.add_argument("--copies", type=int, default=8,
                    help="distinct weights a layer row cycles through (the head too)")
    a = ap.parse_args()

    path = quant.default_path()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"kernel path {path}, threading {quant.threading_kind()}, group {a.group}, "
          f"median of {a.repeats} interleaved blocks of ~{a.block_ms:g} ms\n")
    print("| model | layer | in→out | batch | threads | fp32 µs | int8pack µs | int8 µs | "
          "int4 µs | int8 × | int4 × | fp32 GB/s | int8 GB/s | int4 GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for batch in a.batches:
            for threads in a.threads:
                bench_model(model, batch, threads, a)

if __name__ == "__main__":
    main()
