"""What stop strings cost: one greedy request without them, with 4 short ones, and with 2,000
stop strings of 1 KB (issue 15's hostile request), through the library and over HTTP.

    python benchmarks/bench_stop_strings.py              # tiny random model, 256 tokens
    python benchmarks/bench_stop_strings.py --tokens 512 --repeats 5

A tiny random MiniMind2 checkpoint decodes greedily for exactly ``--tokens`` tokens (its random
weights never write eos, and random letters never form a stop string, as the table's token
column shows), so every row generates the same tokens and only the stop matching differs. The
HTTP rows include sending and parsing the 2 MB JSON body. Prints a markdown table: median
seconds of ``--repeats`` runs and the ratio to the row without stop strings.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import harness


def load_engine():
    from safetensors.numpy import save_file

    import minimind_core
    from minimind_core.config import MINIMIND2, ModelConfig

    config = ModelConfig.for_generation(MINIMIND2, 128, 2, num_attention_heads=8,
                                        num_key_value_heads=2, head_dim=16)
    path = Path(tempfile.mkdtemp(prefix="bench_stop_")) / "random.safetensors"
    save_file(harness.random_state(config), str(path))
    shared = harness.ROOT.parent / "shared" / "minimind-tokenizers" / "minimind2"
    tok = shared if (shared / "tokenizer.json").is_file() else harness.tokenizer_dir()
    return minimind_core.load(path, backend="torch", tokenizer=tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import httpx

    from minimind_core.server import BackgroundServer, create_app

    engine = load_engine()
    rng = random.Random(0)
    cases = {
        "none": [],
        "4 short": ["\n\nUser:", "</s>", "Observation:", "###"],
        "2,000 of 1 KB": ["".join(rng.choices(string.ascii_letters, k=1024))
                          for _ in range(2000)],
    }
    prompt = "hello world"
    rows = []

    def timed(fn) -> tuple[float, int]:
        times, n = [], 0
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), n

    with BackgroundServer(create_app(engine, model_name="bench")) as server, httpx.Client(
            base_url=server.url, timeout=600) as http:
        for name, stops in cases.items():
            lib, n_lib = timed(lambda stops=stops: engine.generate(
                prompt, max_new_tokens=a.tokens, temperature=0, stop=stops).completion_tokens)

            def over_http(stops=stops) -> int:
                r = http.post("/v1/completions", json={
                    "prompt": prompt, "max_tokens": a.tokens, "temperature": 0,
                    **({"stop": stops} if stops else {})})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            web, n_web = timed(over_http)
            rows.append((name, n_lib, lib, web))
    base_lib, base_web = rows[0][2], rows[0][3]
    print(f"Stop strings — {platform.machine()}, Python {sys.version.split()[0]}, tiny random "
          f"MiniMind2 (torch, CPU), greedy, median of {a.repeats}\n")
    print("| stop strings | tokens | library (s) | vs none | over HTTP (s) | vs none |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, lib, web in rows:
        print(f"| {name} | {n} | {lib:.3f} | {lib / base_lib:.2f}x | {web:.3f} | "
              f"{web / base_web:.2f}x |")


if __name__ == "__main__":
    main()
