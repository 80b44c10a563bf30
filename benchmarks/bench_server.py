"""``minimind serve`` under load: continuous batching and the prefix cache, measured over HTTP.

    python benchmarks/bench_server.py                    # the demo model and a MiniMind-3 shape
    python benchmarks/bench_server.py --models minimind-3 --tokens 64
    git worktree add /tmp/old-server dc46f0e             # the one-request-at-a-time server
    python benchmarks/bench_server.py --baseline /tmp/old-server

For each model (the embedded demo, and random float32 weights of the released MiniMind-3 shape,
768 x 8 layers, 64M) the server runs as users run it: ``python -m minimind_core.server`` in its
own process with its default scheduler (--max-num-seqs 16). Client threads in this process
stream /v1/completions, one distinct prompt per client (so the prefix cache shares nothing
between them) and a fixed ``max_tokens``; each client's connection is opened before the clock
starts and all start together. Prints markdown tables:

1. concurrency 1, 4, 16, 64 and the same 16 requests one after another -> aggregate tok/s
   (completion tokens from ``usage`` / wall time), p50 / p99 over the clients of the time to
   first token and of the inter-token latency (a stream's mean gap between token events). With
   ``--baseline DIR`` (a checkout of an older minimind-core, e.g. the one-at-a-time server of
   dc46f0e) that checkout's server is measured on the same model in the same run, and both
   servers answer 32 requests at concurrency 1, 8 at a time taking turns (the
   no-slowdown check).
2. a 20-turn chat replayed through /v1/chat/completions, each turn's TTFT with the prefix cache
   and on a second server started with ``--no-prefix-cache``: with the cache each turn prefills
   only its new tokens.

The clients share the machine's cores with the server (state the load and threads with the
figures). Bounded: every request has a token cap; ends by itself in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness

PROMPT = "Tell me a long story about the sea, the ships and the people who sail them."
MODEL_ID = "bench"
LEVELS = (1, 4, 16, 64)


def model_args(name: str) -> tuple[list[str], str] | None:
    """Server flags for ``demo`` (the embedded model) or random weights of a harness shape."""
    from minimind_core.demo import DEMO_DIR

    if name == "demo":
        if not (DEMO_DIR / "model.safetensors").is_file():
            return None
        return [], "embedded demo model"
    from safetensors.numpy import save_file

    config = harness.config_for(name)
    path = Path(tempfile.mkdtemp(prefix="bench_server_")) / "random.safetensors"
    save_file(harness.random_state(config), str(path))
    return (["-m", str(path), "--tokenizer", str(harness.tokenizer_dir())],
            f"random {name} ({config.hidden_size} x {config.num_hidden_layers})")


class Server:
    """``python -m minimind_core.server`` of the checkout ``root`` in its own process."""

    def __init__(self, root: Path, args: list[str], threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minimind_core.server", *args, "--port", str(port),
             "--served-model-name", MODEL_ID, "--max-queue", "256", "--log-level", "warning"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not answer /health within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


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
        """Mean time between two token events of this stream (the client reads events in
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
                    # a completion event per token ("" when it makes no character yet)
                    if "text" in c or delta.get("content") or delta.get("reasoning_content"):
                        res.chunks.append(now)
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # a benchmark reports errors, it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
    return res


def request(i: int, tokens: int) -> dict:
    """Client ``i``'s completion request: its own prompt (nothing shared with another's)."""
    return {"model": MODEL_ID, "prompt": f"{i}: {PROMPT}", "max_tokens": tokens,
            "temperature": 0}


def run_clients(url: str, n: int, tokens: int, sequential: bool = False
                ) -> tuple[float, list[Result]]:
    """``n`` requests (client ``i`` asks with prompt ``i``), all at once or one by one; the
    connections are made before the clock starts. Returns (wall seconds, results)."""
    import httpx

    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(n)]
    for http in clients:
        http.get("/health")  # opens the connection the request will reuse
    bodies = [request(i, tokens) for i in range(n)]
    results: list[Result] = [Result() for _ in range(n)]
    gate = threading.Barrier(n + 1)

    def client(i: int) -> None:
        if not sequential:
            gate.wait()
        results[i] = stream(clients[i], "/v1/completions", bodies[i])

    try:
        if sequential:
            t0 = time.perf_counter()
            for i in range(n):
                client(i)
        else:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            gate.wait()
            for t in threads:
                t.join()
        return time.perf_counter() - t0, results
    finally:
        for http in clients:
            http.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def concurrency_rows(label: str, url: str, tokens: int, levels: tuple[int, ...]
                     ) -> tuple[list[str], dict[str, float]]:
    """Table rows for ``levels`` and 16 one by one; also {level: tok/s}."""
    run_clients(url, 2, 4)  # warm-up: first-call costs are not what is measured
    rows, rates = [], {}
    for name, n, seq in [*[(str(c), c, False) for c in levels], ("16 one by one", 16, True)]:
        wall, results = run_clients(url, n, tokens, sequential=seq)
        ok = [r for r in results if r.error is None]
        total = sum(r.tokens for r in ok)
        ttft = [r.ttft for r in ok if r.ttft is not None]
        gaps = [r.itl for r in ok if r.itl is not None]
        rates[name] = total / wall
        rows.append(f"| {label} | {name} | {total / wall:.1f} | {1e3 * pct(ttft, .5):.0f} | "
                    f"{1e3 * pct(ttft, .99):.0f} | {1e3 * pct(gaps, .5):.1f} | "
                    f"{1e3 * pct(gaps, .99):.1f} | {total} | {len(results) - len(ok)} |")
    return rows, rates


def interleaved(url_a: str, url_b: str, tokens: int, n: int, block: int = 8
                ) -> tuple[float, float]:
    """Concurrency 1 on two servers taking turns, ``block`` requests at a time (the same
    prompts to both): drift of a shared machine hits both alike, and a server whose threads
    still spin after its turn (OpenMP waits ~0.2 s before sleeping) touches one request of the
    other's block, not every one. Returns each server's tok/s over its own request times."""
    import httpx

    spent, made = [0.0, 0.0], [0, 0]
    with httpx.Client(base_url=url_a, timeout=600) as ha, \
            httpx.Client(base_url=url_b, timeout=600) as hb:
        for first in range(0, n, block):
            for k, http in enumerate((ha, hb)):
                for i in range(first, min(first + block, n)):
                    http.get("/health")
                    t = time.perf_counter()
                    res = stream(http, "/v1/completions", request(i, tokens))
                    spent[k] += time.perf_counter() - t
                    made[k] += res.tokens
    return made[0] / spent[0], made[1] / spent[1]


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
    p.add_argument("--threads", type=int, default=0,
                   help="the server's torch threads (OMP_NUM_THREADS; 0: torch's default)")
    p.add_argument("--baseline", type=Path,
                   help="a checkout of an older minimind-core whose server is measured too")
    a = p.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    threads = a.threads or torch.get_num_threads()
    print(f"Server benchmark — {platform.machine()} {platform.system()}, {cores} cores (load "
          f"{load}), torch {torch.__version__}, server with {threads} thread(s), float32, "
          f"max_tokens {a.tokens}, default scheduler (--max-num-seqs 16)\n")
    t_all = time.perf_counter()
    for name in a.models:
        found = model_args(name)
        if found is None:
            print(f"## {name} (not built)\n")
            continue
        args, what = found
        print(f"## {what}\n\n| server | concurrency | tok/s (all) | TTFT p50 ms | TTFT p99 ms | "
              "ITL p50 ms | ITL p99 ms | tokens | errors |\n|---|---|---|---|---|---|---|---|---|")
        with Server(harness.ROOT, args, a.threads) as server:
            rows, ours = concurrency_rows("this checkout", server.url, a.tokens, LEVELS)
            print("\n".join(rows), flush=True)
            with_cache = chat_ttfts(server.url, a.turns, a.reply_tokens)
            if a.baseline:
                with Server(a.baseline.resolve(), args, a.threads) as base:
                    rows, old = concurrency_rows(f"baseline {a.baseline.name}", base.url,
                                                 a.tokens, (1, 16))
                    print("\n".join(rows), flush=True)
                    paired = interleaved(server.url, base.url, a.tokens, 32)
        print(f"\n16 concurrent ÷ 16 one by one: {ours['16'] / ours['16 one by one']:.2f}x")
        if a.baseline:
            print(f"16 concurrent, this checkout ÷ baseline: {ours['16'] / old['16']:.2f}x")
            print(f"concurrency 1, 32 requests to each server, 8 at a time taking turns "
                  f"(this checkout, baseline, ...): {paired[0]:.1f} vs {paired[1]:.1f} tok/s = "
                  f"{paired[0] / paired[1]:.2f}x")
        with Server(harness.ROOT, [*args, "--no-prefix-cache"], a.threads) as server:
            without = chat_ttfts(server.url, a.turns, a.reply_tokens)
        print(f"\n{a.turns}-turn chat, TTFT per turn (ms):\n\n| turn | prefix cache | "
              "--no-prefix-cache | ratio |\n|---|---|---|---|")
        for i, (x, y) in enumerate(zip(with_cache, without)):
            print(f"| {i + 1} | {1e3 * x:.1f} | {1e3 * y:.1f} | {x / y:.2f} |")
        print(flush=True)
    print(f"(total {time.perf_counter() - t_all:.0f} s; TTFT: request sent -> first SSE "
          "event (sent with the first token); ITL: a stream's mean gap between token events)")
    print("(the no-cache turn has nothing to share, so it is also the 'same length, sharing "
          "nothing' baseline for the cached one)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
