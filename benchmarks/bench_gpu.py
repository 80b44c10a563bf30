"""GPU speed: CUDA-graph decode vs eager vs transformers (static cache + torch.compile).

    python benchmarks/bench_gpu.py                   # needs CUDA; fp16; batch 1, 8, 64
    python benchmarks/bench_gpu.py --device cpu --dtype float32 --batches 1 8 --shapes minimind2-small

On CPU the same script reports the compiled vs eager ratio of the static decode step.
Prints a markdown table with decode tok/s, prefill tok/s (512 tokens), TTFT and peak GPU memory.
"""

from __future__ import annotations

import sys

import harness


def main() -> None:
    p = harness.parser({"shapes": ["minimind2-small", "minimind2", "minimind2-moe", "minimind-3"],
                        "device": "cuda", "dtype": "float16", "batches": [1, 8, 64],
                        "new_tokens": 256})
    a = p.parse_args()
    import torch

    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: no CUDA device here; run with --device cpu for the compiled vs "
                     "eager ratio on CPU")
        impls = ["ours", "decode=eager", "transformers-static", "transformers"]
        baseline = "transformers-static"
        where = torch.cuda.get_device_name()
    else:
        impls, baseline, where = ["decode=compiled", "ours"], "ours", "CPU"
    results = harness.run_all(impls, a)
    print(f"\nDecode benchmark on {where}, {a.dtype}, torch {torch.__version__}, "
          f"prompt {a.prompt_tokens}, {a.new_tokens} new tokens\n")
    print(harness.table(results, impls, a, baseline=baseline))


if __name__ == "__main__":
    sys.exit(main())
