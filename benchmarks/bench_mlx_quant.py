"""What MLX quantization costs on the embedded demo model: folder size and exact-answer accuracy.

Converts the model (default: the embedded demo) with ``converters.to_mlx`` to fp16, 8-bit and 4-bit
folders, asks each the demo's held-out arithmetic questions with greedy decoding, and prints a
markdown table: size on disk, size vs fp16, exact-answer accuracy, and how many greedy answers
are identical to the fp16 folder's.

    python benchmarks/bench_mlx_quant.py                 # every held-out question
    python benchmarks/bench_mlx_quant.py --limit 100     # a spread-out subset
    python benchmarks/bench_mlx_quant.py --model out/full_sft_512.pth --questions none
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = (("fp16", 0), ("8-bit", 8), ("4-bit", 4))


def questions(limit: int | None) -> list[tuple[str, str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from demo_corpus import held_out_questions

    qs = held_out_questions()
    if limit and limit < len(qs):
        step = len(qs) // limit
        qs = qs[::step][:limit]
    return qs


def answers(engine, asked: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    return [engine.chat([{"role": "user", "content": q}], max_new_tokens=max_new_tokens,
                        temperature=0).text.strip() for q, _ in asked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="source checkpoint (default: the demo model)")
    parser.add_argument("--limit", type=int, default=None, help="ask only this many questions")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu / gpu (default: auto)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="enough for the demo's worked answers (about 40 tokens)")
    parser.add_argument("--questions", choices=("demo", "none"), default="demo",
                        help="'none' reports sizes only (for models other than the demo)")
    args = parser.parse_args(argv)

    from converters.common import folder_size
    from converters.to_mlx import convert
    from minimind_core import load

    source = args.model
    if source is None:
        from minimind_core.demo import demo_model_path

        try:
            source = demo_model_path()
        except FileNotFoundError as e:
            print(f"pending: {e}")
            return 0
    asked = questions(args.limit) if args.questions == "demo" else []

    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="bench-mlx-quant-") as tmp:
        for name, bits in VARIANTS:
            folder = convert(source, Path(tmp) / name, q_bits=bits or None,
                             q_group_size=args.group_size, dtype="float16", progress=False)
            engine = load(folder, backend="mlx", device=args.device)
            t0 = time.perf_counter()
            got = answers(engine, asked, args.max_new_tokens)
            seconds = time.perf_counter() - t0
            if reference is None:
                reference = got
            rows.append({
                "name": name,
                "size": folder_size(folder),
                "correct": sum(g == want for g, (_, want) in zip(got, asked, strict=True)),
                "same": sum(g == r for g, r in zip(got, reference, strict=True)),
                "seconds": seconds,
                "device": engine.info["device"],
            })

    base = rows[0]["size"]
    n = len(asked)
    print(f"source: {source}; {n} held-out questions, greedy, group size {args.group_size}, "
          f"device {rows[0]['device']}\n")
    print("| variant | folder size | vs fp16 | exact answers | same answer as fp16 | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = f"{r['correct']}/{n} ({r['correct'] / n:.1%})" if n else "–"
        same = f"{r['same']}/{n} ({r['same'] / n:.1%})" if n else "–"
        print(f"| {r['name']} | {r['size'] / 1e6:.2f} MB | {r['size'] / base:.1%} | {acc} | {same} "
              f"| {r['seconds']:.1f}s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
