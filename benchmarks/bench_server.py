"""``minimind serve`` under load: continuous batching and the prefix cache, measured over HTTP.

    python benchmarks/bench_server.py                    # the demo model and a MiniMind-3 shape
    python benchmarks/bench_server.py --tokens 64 --threads 2
    python benchmarks/bench_server.py --models minimind-3 --turns 10

For each model (the embedded demo, and random float32 weights of the released MiniMind-3 shape,
768 x 8 layers, 64M), one server in this process (uvicorn in a thread, default scheduler
settings: --max-num-seqs 16) and client threads streaming /v1/completions with a fixed prompt
and ``max_tokens``. Prints markdown tables:

1. concurrency 1, 4, 16, 64 (and the same 16 requests one after another) -> aggregate tok/s
   (completion tokens from ``usage`` / wall time), p50 / p99 over the clients of the time to
   first token and of the inter-token latency (a stream's mean gap between text chunks).
2. a 20-turn chat replayed through /v1/chat/completions, each turn's TTFT with the prefix cache
   and on a second server started with ``prefix_cache_mb=0`` (``--no-prefix-cache``): with the
   cache each turn prefills only its new tokens.

The clients share the process (and the GIL) with the server, so the figures are a lower bound
for clients elsewhere. Bounded: every request has a token cap; ends by itself in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness

PROMPT = "Tell me a long story about the sea, the ships and the people who sail them."
MODEL_ID = "bench"
LEVELS = (1, 4, 16, 64)


def load_engine(name: str):
    """``demo``: the embedded demo model; otherwise random weights of a harness shape."""
    import minimind_core
    from minimind_core.demo import DEMO_DIR

    if name == "demo":
        if not (DEMO_DIR / "model.safetensors").is_file():
            return None, "demo (not built)"
        return minimind_core.load(backend="torch", dtype="float32"), "embedded demo model"
    from safetensors.numpy import save_file

    config = harness.config_for(name)
    path = Path(tempfile.mkdtemp(prefix="bench_server_")) / "random.safetensors"
    save_file(harness.random_state(config), str(path))
    engine = minimind_core.load(path, backend="torch", dtype="float32",
                                tokenizer=harness.tokenizer_dir())
    return engine, f"random {name} ({config.hidden_size} x {config.num_hidden_layers})"


@dataclass
class Result:
    """One streamed request: when it started, when each text chunk came, tokens from usage."""

    start: float = 0.0
    first: float = 0.0  # the first SSE event (for chat: the role chunk, sent with token 1)
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        """Request sent -> first event: every check and the first token happen before the
        server sends a byte, so this holds even when the first tokens decode to no text."""
        return self.first - self.start if self.first else None

    @property
    def itl(self) -> float | None:
        """Mean time between two text chunks of this stream (the client reads chunks in
        bursts, so single gaps say more about its thread than about the server)."""
        if len(self.chunks) < 2:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (len(self.chunks) - 1)


def stream(http, path: str, body: dict) -> Result:
    """POST a streaming request and time its SSE chunks."""
    res = Result(start=time.perf_counter())
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}"
                r.read()
                return res
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                res.first = res.first or now  # the server answers once the first token is drawn
                for c in event.get("choices", []):
                    delta = c.get("delta") or {}
                    if c.get("text") or delta.get("content") or delta.get("reasoning_content"):
                        res.chunks.append(now)
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # a benchmark reports errors, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
    return res


def run_clients(url: str, n: int, tokens: int, sequential: bool = False
                ) -> tuple[float, list[Result]]:
    import httpx

    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    results: list[Result] = [Result() for _ in range(n)]

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            results[i] = stream(http, "/v1/completions", body)

    t0 = time.perf_counter()
    if sequential:
        for i in range(n):
            client(i)
    else:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return time.perf_counter() - t0, results


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def concurrency_rows(url: str, tokens: int) -> list[str]:
    run_clients(url, 2, 4)  # warm-up: first-call costs are not what is measured
    rows = []
    for label, n, seq in [*[(str(c), c, False) for c in LEVELS], ("16 one by one", 16, True)]:
        wall, results = run_clients(url, n, tokens, sequential=seq)
        ok = [r for r in results if r.error is None]
        total = sum(r.tokens for r in ok)
        ttft = [r.ttft for r in ok if r.ttft is not None]
        gaps = [r.itl for r in ok if r.itl is not None]
        rows.append(f"| {label} | {total / wall:.1f} | {1e3 * pct(ttft, .5):.0f} | "
                    f"{1e3 * pct(ttft, .99):.0f} | {1e3 * pct(gaps, .5):.1f} | "
                    f"{1e3 * pct(gaps, .99):.1f} | {total} | {len(results) - len(ok)} |")
    return rows


def chat_ttfts(url: str, turns: int, reply_tokens: int) -> list[float]:
    """TTFT of each turn of one chat whose history grows by the server's own replies."""
    import httpx

    messages: list[dict] = []
    out = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn + 1}: {PROMPT}"})
            body = {"model": MODEL_ID, "messages": messages, "max_tokens": reply_tokens,
                    "temperature": 0}
            res = stream(http, "/v1/chat/completions", body)
            out.append(res.ttft if res.ttft is not None else float("nan"))
            r = http.post("/v1/chat/completions", json=body).json()  # the reply text
            messages.append({"role": "assistant",
                             "content": r["choices"][0]["message"]["content"]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "minimind-3"],
                   help="'demo' and/or harness shapes (default: demo minimind-3)")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--turns", type=int, default=20, help="turns of the replayed chat")
    p.add_argument("--reply-tokens", type=int, default=24, help="max_tokens per chat turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()

    import torch

    from minimind_core.params import SamplingParams
    from minimind_core.server import BackgroundServer, create_app

    if a.threads:
        torch.set_num_threads(a.threads)
    logging.getLogger("minimind_core.server").setLevel(logging.ERROR)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Server benchmark — {platform.machine()} {platform.system()}, {cores} cores (load "
          f"{load}), torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, "
          f"max_tokens {a.tokens}, default scheduler (--max-num-seqs 16)\n")
    t_all = time.perf_counter()
    for name in a.models:
        engine, what = load_engine(name)
        print(f"## {what}\n")
        if engine is None:
            continue
        defaults = SamplingParams(max_new_tokens=256)
        cached = BackgroundServer(create_app(engine, model_name=MODEL_ID, defaults=defaults,
                                             max_queue=256)).start()
        try:
            print("| concurrency | tok/s (all) | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
                  "ITL p99 ms | tokens | errors |\n|---|---|---|---|---|---|---|---|")
            print("\n".join(concurrency_rows(cached.url, a.tokens)), flush=True)
            with_cache = chat_ttfts(cached.url, a.turns, a.reply_tokens)
        finally:
            cached.stop()
        plain = BackgroundServer(create_app(engine, model_name=MODEL_ID, defaults=defaults,
                                            prefix_cache_mb=0)).start()
        try:
            without = chat_ttfts(plain.url, a.turns, a.reply_tokens)
        finally:
            plain.stop()
        print(f"\n{a.turns}-turn chat, TTFT per turn (ms):\n\n| turn | prefix cache | "
              "--no-prefix-cache | ratio |\n|---|---|---|---|")
        for i, (x, y) in enumerate(zip(with_cache, without)):
            print(f"| {i + 1} | {1e3 * x:.1f} | {1e3 * y:.1f} | {x / y:.2f} |")
        print(flush=True)
    print(f"(total {time.perf_counter() - t_all:.0f} s; TTFT: request sent -> first SSE "
          "event (sent with the first token); ITL: a stream's mean gap between text chunks)")
    print("(the no-cache turn has nothing to share, so it is also the 'same length, sharing "
          "nothing' baseline for the cached one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
