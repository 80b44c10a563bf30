"""CPU speed: TorchEngine vs transformers' generate on the same random weights.

    python benchmarks/bench_decode.py                # minimind2-small and minimind-3, fp32, 2 threads
    python benchmarks/bench_decode.py --compile      # adds the torch.compile'd static decode step

Rows: ours (the default CPU step, small ops in C: backends/torch/native.py), ours-torch-ops
(the same engine with native=False), transformers, and the matrix-vector floor.
Prints a markdown table: decode tok/s at batch 1 and 8, prefill tok/s for a 512-token prompt,
time to first token of that prompt, load→first token, peak RSS, and the batch-1 ratio to
transformers. Each row runs in its own process. A benchmark, not a test: compare rows of one run.
"""

from __future__ import annotations

import platform
import sys

import harness


def main() -> None:
    p = harness.parser({"shapes": ["minimind2-small", "minimind-3"], "device": "cpu",
                        "dtype": "float32", "batches": [1, 8], "new_tokens": 64})
    p.add_argument("--compile", action="store_true", help="also measure torch.compile on CPU")
    a = p.parse_args()
    impls = ["ours", "ours-torch-ops", "transformers", "matvec-floor"] + (["ours-compiled"] if a.compile else [])
    results = harness.run_all(impls, a)
    import torch

    print(f"\nCPU decode benchmark — {platform.processor() or platform.machine()}, "
          f"{a.threads} threads, {a.dtype}, torch {torch.__version__}, prompt {a.prompt_tokens} "
          f"tokens, {a.new_tokens} new tokens, median of {a.repeats}\n")
    print(harness.table(results, impls, a, baseline="transformers"))


if __name__ == "__main__":
    sys.exit(main())
