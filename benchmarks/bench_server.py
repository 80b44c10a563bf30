"""The OpenAI-compatible server's own cost: the same generations through the Engine and over HTTP.

    python benchmarks/bench_server.py              # the demo model if built, else a tiny random one
    python benchmarks/bench_server.py --random     # always the tiny random model
    python benchmarks/bench_server.py --tokens 1024 --threads 2

Everything runs in this one process on 127.0.0.1: uvicorn in a background thread, the clients
(the ``openai`` package) in the main thread or in client threads. So the client's SSE parsing
shares the GIL and the cores with the server: the "server cost" figures are an upper bound for
a client in another process. Prints a markdown table:

1. N streamed tokens: ``engine.stream_chat`` vs the same chat request over SSE — tokens/s both
   ways and the server's cost per streamed token (µs).
2. Non-streaming latency of a max_tokens=1 request (median of 20 on one keep-alive connection)
   vs ``engine.chat`` with max_new_tokens=1.
3. 16 concurrent streaming clients (threads), max_tokens=32 each: wall time, aggregate tokens/s,
   errors (the server generates one request at a time, so this measures queueing, not batching).
4. A client that disconnects after 5 chunks of a max_tokens=2000 stream: how many tokens the
   engine generated after the connection closed, counted by wrapping the engine's token loop
   (``Engine._sample``, one count per token the token loop drew).

Token counts are the server's ``usage.completion_tokens`` / the engine's final-chunk usage, never
the number of SSE chunks (one chunk may carry several tokens when a UTF-8 character spans them).
A benchmark, not a test: bounded loops, ends by itself in about a minute.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness

from minimind_core.params import SamplingParams

PROMPTS = ["你好", "Tell me a long story about the sea.", "1+2=?", "介绍一下你自己"]
MODEL_ID = "bench"


# -- the model and the server -----------------------------------------------------------------


def load_engine(force_random: bool):
    """The embedded demo model when it is built, else a tiny random MiniMind-3 checkpoint of the
    demo's shape (hidden 96, 3 layers, 4 heads / 2 kv heads) with an upstream tokenizer."""
    import minimind_core
    from minimind_core.config import MINIMIND3, ModelConfig
    from minimind_core.demo import DEMO_DIR

    if not force_random and (DEMO_DIR / "model.safetensors").is_file():
        return minimind_core.load(), "embedded demo model"
    from safetensors.numpy import save_file

    shared_m3 = harness.ROOT.parent / "shared" / "minimind-tokenizers" / "minimind3"
    tok = shared_m3 if (shared_m3 / "tokenizer.json").is_file() else harness.tokenizer_dir()
    config = ModelConfig.for_generation(MINIMIND3, 96, 3, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=24)
    path = Path(tempfile.mkdtemp(prefix="bench_server_")) / "random.safetensors"
    save_file(harness.random_state(config), str(path))
    return minimind_core.load(path, backend="torch", tokenizer=tok), (
        f"random {config.kind} hidden {config.hidden_size} x {config.num_hidden_layers} layers "
        f"(tokenizer {Path(tok).name})")


@dataclass
class Generation:
    tokens: int = 0
    closed: threading.Event = field(default_factory=threading.Event)


class TokenCounter:
    """Counts every token the engine's token loop draws, per generation (one per prefilled row),
    and notes when the row's cache slot is freed (the generation really stopped)."""

    def __init__(self, engine) -> None:
        self.generations: list[Generation] = []
        by_slot: dict[int, Generation] = {}
        prefill, sample, new_cache = engine._prefill, engine._sample, engine._new_cache

        def counted_prefill(cache, slot, ids):
            by_slot[slot] = gen = Generation()
            self.generations.append(gen)
            return prefill(cache, slot, ids)

        def counted_sample(logits, rows):
            for row in rows:
                by_slot[row.slot].tokens += 1
            return sample(logits, rows)

        def watched_cache(slots, max_len):
            cache = new_cache(slots, max_len)
            free = cache.free

            def freed(slot):
                free(slot)
                by_slot[slot].closed.set()

            cache.free = freed
            return cache

        engine._prefill, engine._sample = counted_prefill, counted_sample
        engine._new_cache, engine._cache = watched_cache, None  # the instance attributes win


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Request:
    """One chat request, as sampling parameters both the engine and the server understand."""

    prompt: str
    temperature: float
    seed: int | None
    max_tokens: int

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=1.0, seed=self.seed)

    def body(self) -> dict:
        return {"model": MODEL_ID, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": 1.0, "seed": self.seed}


def direct_stream(engine, req: Request) -> tuple[float, int]:
    """Seconds and completion tokens of one ``engine.stream_chat`` run, read to the end."""
    t = time.perf_counter()
    tokens = 0
    for chunk in engine.stream_chat(req.messages, req.params()):
        if chunk.finish_reason is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t, tokens


def http_stream(client, req: Request) -> tuple[float, int]:
    """Seconds and ``usage.completion_tokens`` of the same request over SSE, read to [DONE]."""
    t = time.perf_counter()
    tokens = 0
    stream = client.chat.completions.create(**req.body(), stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t, tokens


def pick_long_request(engine, n: int) -> Request:
    """A request that streams as close to ``n`` tokens as the model will: greedy first, then
    seeded sampling at temperature 1 (a trained model soon says eos; a random one never does)."""
    best: tuple[int, Request] | None = None
    for temperature, seed in [(0.0, None)] + [(1.0, s) for s in range(4)]:
        for prompt in PROMPTS[:2] if temperature else PROMPTS:
            req = Request(prompt, temperature, seed, n)
            _, tokens = direct_stream(engine, req)
            if best is None or tokens > best[0]:
                best = (tokens, req)
            if tokens >= n:
                return req
    return best[1]


def row_stream(engine, client, n: int, rounds: int) -> dict:
    req = pick_long_request(engine, n)
    _, per_request = direct_stream(engine, req)
    repeat = max(1, min(20, math.ceil(n / max(per_request, 1))))  # short replies: send several
    direct_t, http_t, mismatch = [], [], 0
    for _ in range(rounds):  # interleaved so machine load drifts hit both sides alike
        d = [direct_stream(engine, req) for _ in range(repeat)]
        h = [http_stream(client, req) for _ in range(repeat)]
        mismatch += sum(a[1] != b[1] for a, b in zip(d, h))
        direct_t.append(sum(x[0] for x in d))
        http_t.append(sum(x[0] for x in h))
    tokens = per_request * repeat
    td, th = statistics.median(direct_t), statistics.median(http_t)
    return {"req": req, "tokens": tokens, "repeat": repeat, "direct_tps": tokens / td,
            "http_tps": tokens / th, "overhead_us": (th - td) / tokens * 1e6,
            "mismatch": mismatch, "rounds": rounds}


def row_latency(engine, client, n: int = 20) -> dict:
    req = Request(PROMPTS[0], 0.0, None, 1)
    for _ in range(2):  # warm the connection and the engine
        client.chat.completions.create(**req.body())
    direct, http = [], []
    for _ in range(n):
        t = time.perf_counter()
        engine.chat(req.messages, req.params())
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = client.chat.completions.create(**req.body())
        http.append(time.perf_counter() - t)
        assert r.usage.completion_tokens == 1, r.usage
    return {"direct_ms": statistics.median(direct) * 1e3, "http_ms": statistics.median(http) * 1e3,
            "http_p90_ms": statistics.quantiles(http, n=10)[-1] * 1e3, "n": n}


def row_concurrent(client, clients: int = 16, max_tokens: int = 32) -> dict:
    results: list[tuple[int, float] | None] = [None] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        try:
            # different seeds: 16 different replies, as from 16 users
            tokens = http_stream(client, Request(PROMPTS[i % len(PROMPTS)], 1.0, i,
                                                 max_tokens))[1]
            if tokens == 0:
                raise RuntimeError("no usage chunk")
            results[i] = (tokens, time.perf_counter() - t)
        except Exception as e:  # counted, not raised: the row reports errors
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in threads:
        th.join(120)
    wall = time.perf_counter() - t
    done = [r for r in results if r is not None]
    tokens = sum(r[0] for r in done)
    return {"clients": clients, "max_tokens": max_tokens, "wall_s": wall, "tokens": tokens,
            "tps": tokens / wall, "errors": len(errors) + sum(th.is_alive() for th in threads),
            "first_error": errors[0] if errors else "",
            "slowest_s": max((r[1] for r in done), default=0.0)}


def row_disconnect(engine, client, counter: TokenCounter, after_chunks: int = 5,
                   max_tokens: int = 2000) -> dict:
    req = pick_long_request(engine, 64)  # long-running: greedy on a random model, else sampled
    req = Request(req.prompt, req.temperature, req.seed, max_tokens)
    full = direct_stream(engine, req)[1]  # what the stream would have been, uninterrupted
    stream = client.chat.completions.create(**req.body(), stream=True)
    got = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == after_chunks:
                break
    gen = counter.generations[-1]
    at_close = gen.tokens
    t = time.perf_counter()
    stream.close()  # closes the HTTP response: the TCP connection goes away
    stopped = gen.closed.wait(30)
    return {"chunks": got, "at_close": at_close, "after": gen.tokens - at_close,
            "stop_ms": (time.perf_counter() - t) * 1e3 if stopped else float("nan"),
            "stopped": stopped, "full": full, "max_tokens": max_tokens}


# -- report -----------------------------------------------------------------------------------


def describe_req(req: Request) -> str:
    how = "greedy" if not req.temperature else f"T={req.temperature:g} seed {req.seed}"
    return f"{req.prompt!r}, {how}"


def table(s: dict, lat: dict, con: dict, dis: dict) -> str:
    rows = [
        ("measurement", "engine direct", "over HTTP (openai client)", "server cost", "notes"),
        (f"1. stream {s['tokens']} tokens (SSE)", f"{s['direct_tps']:.0f} tok/s",
         f"{s['http_tps']:.0f} tok/s", f"{s['overhead_us']:.0f} µs/token",
         f"{s['repeat']} request(s) of {s['tokens'] // s['repeat']} tokens, "
         f"{describe_req(s['req'])}; median of {s['rounds']}; token-count mismatches "
         f"engine vs server: {s['mismatch']}"),
        ("2. non-stream, max_tokens=1", f"{lat['direct_ms']:.1f} ms", f"{lat['http_ms']:.1f} ms",
         f"{lat['http_ms'] - lat['direct_ms']:.1f} ms/request",
         f"median of {lat['n']} on one keep-alive connection; HTTP p90 "
         f"{lat['http_p90_ms']:.1f} ms"),
        (f"3. {con['clients']} concurrent streams, max_tokens={con['max_tokens']}", "—",
         f"{con['tps']:.0f} tok/s aggregate", f"errors: {con['errors']}",
         f"{con['tokens']} tokens in {con['wall_s']:.2f} s wall; slowest client "
         f"{con['slowest_s']:.2f} s (one generation at a time, the rest queue)"
         + (f"; first error: {con['first_error']}" if con["first_error"] else "")),
        (f"4. disconnect after {dis['chunks']} chunks, max_tokens={dis['max_tokens']}",
         f"{dis['full']} tokens uninterrupted",
         f"{dis['after']} token(s) generated after the disconnect",
         f"stopped in {dis['stop_ms']:.0f} ms" if dis["stopped"] else "did NOT stop in 30 s",
         f"the engine had produced {dis['at_close']} tokens when the client closed "
         f"(counted in Engine._sample)"),
    ]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="use the tiny random model even when "
                                                         "the demo model is built")
    p.add_argument("--tokens", type=int, default=512, help="tokens streamed in row 1")
    p.add_argument("--rounds", type=int, default=5, help="repeats of row 1 (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the "
                                                          "server and clients need the rest)")
    a = p.parse_args()

    import logging

    import openai
    import torch
    import uvicorn

    from minimind_core.server import BackgroundServer, create_app

    torch.set_num_threads(a.threads)
    # uvicorn's access log and the server's disconnect notes are not what is measured here
    logging.getLogger("minimind_core.server").setLevel(logging.ERROR)
    engine, what = load_engine(a.random)
    counter = TokenCounter(engine)
    # neutral defaults: every request below names its own sampling
    app = create_app(engine, model_name=MODEL_ID, defaults=SamplingParams(max_new_tokens=256))
    server = BackgroundServer(app).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                           timeout=60)
    t0 = time.perf_counter()
    try:
        stream = row_stream(engine, client, a.tokens, a.rounds)
        latency = row_latency(engine, client)
        concurrent = row_concurrent(client)
        disconnect = row_disconnect(engine, client, counter)
    finally:
        client.close()
        server.stop()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\nServer benchmark — {platform.machine()} {platform.system()}, {cores} cores "
          f"(load {load}), torch {torch.__version__} with {torch.get_num_threads()} thread(s) "
          f"on {engine.info.get('device', 'cpu')}, Python {platform.python_version()}, uvicorn "
          f"{uvicorn.__version__}, openai {openai.__version__}; model: {what}; server and "
          f"clients in one process on 127.0.0.1; {time.perf_counter() - t0:.0f} s\n")
    print(table(stream, latency, concurrent, disconnect))
    return 0 if concurrent["errors"] == 0 and disconnect["stopped"] else 1


if __name__ == "__main__":
    sys.exit(main())
