"""Our CPU decode next to llama.cpp's on the same exported model, and the export's parity.

For each released shape (random weights of the real size): the checkpoint is exported with
``converters.to_gguf`` as f32 and as q8_0; llama.cpp (llama-cpp-python, the ``gguf-test`` extra)
runs both with the same thread count as our TorchEngine, batch 1. Printed as markdown:

- decode tok/s: ours fp32 / int8 / int4 (``quantize=8|4``, group 32: llama.cpp's block size),
  llama.cpp f32 / q8_0 / q4_0 (median of ``--repeats``; tokens after
  the first, fed one by one, greedy), each in its own process (two OpenMP runtimes spinning in
  one process would slow both);
- parity of the f32 export: max |logit difference| over every position of a 64-token prompt
  (f32 KV cache, flash attention off), and whether the 24 greedy tokens agree;
- q8_0: cosine of its logits to ours, and the file sizes.

llama.cpp runs without weight repacking (``use_extra_bufts`` off), as in the tests: this VM
reports AMX but raises SIGILL on its tile instructions, which ggml's AMX buffer uses for q8_0.

    python benchmarks/bench_llama_cpp.py [--shapes minimind2-small minimind-3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

PARITY_PROMPT = 64
GREEDY = 24


def llama(path: Path, threads: int, n_ctx: int = 512, logits_all: bool = False):
    """llama.cpp on ``path``: f32 KV cache, no flash attention, no weight repacking."""
    from unittest import mock

    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", no_repack):
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, type_k=0, type_v=0,
                               flash_attn=False, n_threads=threads, n_threads_batch=threads,
                               verbose=False)


def llama_decode_rate(llm, prompt: list[int], new_tokens: int, repeats: int) -> float:
    """Tokens/s of single-token llama_decode calls after the prompt (greedy feed)."""
    def run() -> float:
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return (new_tokens - 1) / (time.perf_counter() - t)

    run()
    return statistics.median(run() for _ in range(repeats))


def ours_decode_rate(engine, prompt: list[int], new_tokens: int, repeats: int) -> float:
    def run() -> float:
        steps = engine.iter_tokens([prompt], max_new_tokens=new_tokens)
        next(steps)  # prefill + the first token
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(steps)
        dt = time.perf_counter() - t
        steps.close()
        return (new_tokens - 1) / dt

    run()
    return statistics.median(run() for _ in range(repeats))


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def worker(a: argparse.Namespace) -> None:
    """One timing in this process: prints {"tok_s": ...} as JSON."""
    rng = np.random.default_rng(1)
    config = harness.config_for(a.shape)
    prompt = rng.integers(3, config.vocab_size, a.prompt_tokens).tolist()
    if a.worker.startswith("ours"):
        from minimind_core import load

        bits = {"ours": None, "ours8": 8, "ours4": 4}[a.worker]
        engine = load(a.path, backend="torch", device="cpu", dtype="float32",
                      tokenizer=harness.tokenizer_dir(), threads=a.threads,
                      num_attention_heads=config.num_attention_heads, quantize=bits,
                      q_group_size=32 if bits else None)
        rate = ours_decode_rate(engine, prompt, a.new_tokens, a.repeats)
    else:
        rate = llama_decode_rate(llama(Path(a.path), a.threads), prompt, a.new_tokens, a.repeats)
    print(json.dumps({"tok_s": rate}))


def timed(kind: str, shape: str, path: Path, a: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--shape", shape,
           "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
           "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(harness.SHAPES), choices=list(harness.SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=("ours", "ours8", "ours4", "llama"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    import llama_cpp
    import torch

    from converters.to_gguf import convert
    from minimind_core import load

    tok = harness.tokenizer_dir()
    rng = np.random.default_rng(2)
    rows = []
    for shape in a.shapes:
        config = harness.config_for(shape)
        src = harness.write_weights(shape)
        folder = Path(tempfile.mkdtemp())
        heads = {"num_attention_heads": config.num_attention_heads}
        f32 = convert(src, folder / "f32.gguf", tokenizer=tok, progress=False, overrides=heads)
        q8 = convert(src, folder / "q8_0.gguf", outtype="q8_0", tokenizer=tok, progress=False,
                     overrides=heads)
        q4 = convert(src, folder / "q4_0.gguf", outtype="q4_0", tokenizer=tok, progress=False,
                     overrides=heads)
        rate_ours, ours8, ours4 = (timed(k, shape, src, a) for k in ("ours", "ours8", "ours4"))
        rate32, rate8, rate4 = (timed("llama", shape, f, a) for f in (f32, q8, q4))

        engine = load(src, backend="torch", device="cpu", dtype="float32", tokenizer=tok,
                      threads=a.threads, **heads)
        ids = rng.integers(3, config.vocab_size, PARITY_PROMPT).tolist()
        ours = engine.logits(ids)
        ours_greedy = [int(r[0]) for r in engine.iter_tokens([ids], max_new_tokens=GREEDY)]
        llm32 = llama(f32, a.threads, logits_all=True)
        diff = float(np.abs(llama_logits(llm32, ids) - ours).max())
        same = llama_greedy(llm32, ids, GREEDY) == ours_greedy
        cos8 = cosine(llama_logits(llama(q8, a.threads, logits_all=True), ids), ours)
        rows.append(f"| {shape} | {config.kind} | {rate_ours:.1f} | {rate32:.1f} | "
                    f"{rate_ours / rate32:.2f}x | {ours8:.1f} | {rate8:.1f} | "
                    f"{ours8 / rate8:.2f}x | {ours4:.1f} | {rate4:.1f} | {ours4 / rate4:.2f}x | "
                    f"{diff:.1e} | {'same' if same else 'DIFFERENT'} | {cos8:.5f} | "
                    f"{f32.stat().st_size / 1e6:.0f} / {q8.stat().st_size / 1e6:.0f} |")
        for f in (f32, q8, q4, *(x.with_suffix(".Modelfile") for x in (f32, q8, q4)), src):
            f.unlink(missing_ok=True)
        del engine, llm32

    print(f"llama.cpp vs ours — {platform.machine()}, {a.threads} threads for both, batch 1, "
          f"prompt {a.prompt_tokens} tokens, {a.new_tokens} new tokens, median of {a.repeats}; "
          f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__} "
          f"(no weight repacking)\n")
    print("| model | kind | ours fp32 | llama.cpp f32 | ratio | ours int8 | llama.cpp q8_0 | "
          "ratio | ours int4 | llama.cpp q4_0 | ratio | f32 max abs diff (64 pos) | greedy 24 | "
          "q8_0 cosine | f32 / q8_0 MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    print(f"\nllama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}")


if __name__ == "__main__":
    main()
