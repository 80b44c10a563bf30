"""CPU speed: every decode-step implementation x batch 1, 4, 16, next to transformers and upstream.

    python benchmarks/bench_decode.py                 # minimind2-small and minimind-3, fp32, 2 threads
    python benchmarks/bench_decode.py --upstream ~/minimind --upstream-v2 ~/minimind-c090b69

Rows: ours (decode=auto: the native step here), decode=eager, decode=native, decode=compiled
(torch.compile on CPU; its compile time is excluded by a warm-up), int8 and int4 (quantize=8|4,
group 32: the native step with the int8/int4 kernels), transformers' generate,
upstream MiniMind's own model.generate (when a checkout is given: nothing of it ships here), and
the matrix-vector floor. Decode tok/s are aggregate over the batch; each row runs in its own
process with the same random weights and the same thread count. A benchmark, not a test: compare
rows of one run.
"""

from __future__ import annotations

import platform
import sys

import harness

IMPLS = ["ours", "decode=eager", "decode=native", "decode=compiled", "int8", "int4",
         "transformers", "upstream", "matvec-floor"]


def main() -> None:
    p = harness.parser({"shapes": ["minimind2-small", "minimind-3"], "device": "cpu",
                        "dtype": "float32", "batches": [1, 4, 16], "new_tokens": 64})
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    a = p.parse_args()
    results = harness.run_all(a.impls, a)
    import torch

    print(f"\nCPU decode benchmark — {platform.processor() or platform.machine()}, "
          f"{a.threads} threads, {a.dtype}, torch {torch.__version__}, prompt {a.prompt_tokens} "
          f"tokens, {a.new_tokens} new tokens, median of {a.repeats}\n")
    baseline = "upstream" if "upstream" in a.impls and (a.upstream or a.upstream_v2) else "transformers"
    print(harness.table(results, a.impls, a, baseline=baseline))


if __name__ == "__main__":
    sys.exit(main())
