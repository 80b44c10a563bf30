"""Shared measurement code for bench_decode.py (CPU) and bench_gpu.py (CUDA).

Each (implementation, shape) runs in its own subprocess so peak memory is its own; both sides
get the same random weights. Timings are medians of a few repeats; what matters is the ratio
between rows measured in one run, not the absolute figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (generation, hidden, layers, use_moe)
    "minimind2-small": ("minimind2", 512, 8, False),
    "minimind2": ("minimind2", 768, 16, False),
    "minimind2-moe": ("minimind2", 640, 8, True),
    "minimind-3": ("minimind3", 768, 8, False),
    "minimind-3-moe": ("minimind3", 768, 8, True),
}


def config_for(shape: str):
    from minimind_core.config import ModelConfig

    generation, hidden, layers, moe = SHAPES[shape]
    return ModelConfig.for_generation(generation, hidden, layers, use_moe=moe)


def random_state(config, seed: int = 0) -> dict[str, np.ndarray]:
    from minimind_core.checkpoint import expected_shapes

    rng = np.random.default_rng(seed)
    return {k: (1.0 + 0.02 * rng.standard_normal(s) if k.endswith("norm.weight") or
                "layernorm" in k else 0.02 * rng.standard_normal(s)).astype(np.float32)
            for k, s in expected_shapes(config).items()}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_prefill(forward, a: argparse.Namespace) -> dict:
    """Median time of one prompt-sized forward (= time to first token) and its tokens/s."""
    import torch

    def run() -> None:
        with torch.inference_mode():
            forward()
        sync(a.device)

    run()
    t = median_time(run, a.repeats)
    return {"ttft_prefill_s": t, "prefill_tok_s": a.prefill_tokens / t}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tokenizer_dir() -> Path:
    """Any MiniMind-vocabulary tokenizer will do (random weights): the demo's, else upstream's."""
    from minimind_core.demo import demo_model_path

    try:
        return demo_model_path()
    except FileNotFoundError:
        shared = ROOT.parent / "shared" / "minimind-tokenizers" / "minimind2"
        if (shared / "tokenizer.json").is_file():
            return shared
        raise


def write_weights(shape: str) -> Path:
    """Random weights of a released shape as a safetensors file in a temp folder."""
    from safetensors.numpy import save_file

    path = Path(tempfile.mkdtemp()) / "weights.safetensors"
    save_file(random_state(config_for(shape)), str(path))
    return path


def bench_ours(shape: str, a: argparse.Namespace) -> dict:

    from minimind_core import load
    from minimind_core.params import SamplingParams

    config = config_for(shape)
    path = write_weights(shape)
    t0 = time.perf_counter()
    key, _, value = a.impl.partition("=")  # "ours", "decode=eager", "int8", "int4"
    decode = value if key == "decode" else "auto"
    bits = {"int8": 8, "int4": 4}.get(a.impl)
    engine = load(path, backend="torch", device=a.device, dtype=a.dtype,
                  tokenizer=tokenizer_dir(), decode=decode, threads=a.threads, quantize=bits,
                  q_group_size=32 if bits else None)
    first = engine.iter_tokens([[1, 2, 3, 4]], max_new_tokens=2)
    next(first)
    out = {"load_to_first_token_s": time.perf_counter() - t0}
    first.close()
    rng = np.random.default_rng(1)
    greedy = SamplingParams(max_new_tokens=a.new_tokens)

    def decode(batch: int) -> float:
        prompts = [rng.integers(3, config.vocab_size, a.prompt_tokens).tolist()
                   for _ in range(batch)]

        def run() -> float:
            steps = engine.iter_tokens(prompts, greedy)
            next(steps)  # prefill + first token
            sync(a.device)
            t = time.perf_counter()
            for _ in range(a.new_tokens - 1):
                next(steps)
            sync(a.device)
            dt = time.perf_counter() - t
            steps.close()
            return batch * (a.new_tokens - 1) / dt

        run()  # warm-up (and graph capture / compile)
        return statistics.median(run() for _ in range(a.repeats))

    for b in a.batches:
        out[f"decode_b{b}"] = decode(b)
    long = [rng.integers(3, config.vocab_size, a.prefill_tokens).tolist()]
    # prefill + the first token: what a user waits for
    def first_token() -> None:
        steps = engine.iter_tokens(long, max_new_tokens=1)
        next(steps)
        steps.close()

    out.update(time_prefill(first_token, a))
    return out


def bench_transformers(shape: str, a: argparse.Namespace) -> dict:
    """transformers' own generate on the same weights, exported with our to_hf converter."""
    import torch
    import transformers

    from converters.to_hf import convert

    config = config_for(shape)
    folder = convert(write_weights(shape), Path(tempfile.mkdtemp()) / "hf",
                     tokenizer=tokenizer_dir(), progress=False)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(a.device).eval()
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if a.impl == "transformers-static":
        gen["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    rng = np.random.default_rng(1)
    out: dict = {}

    def rate(batch: int) -> float:
        ids = torch.tensor([rng.integers(3, config.vocab_size, a.prompt_tokens).tolist()
                            for _ in range(batch)], device=a.device)

        def one(n: int) -> float:
            sync(a.device)
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
            sync(a.device)
            return time.perf_counter() - t

        one(2)  # warm-up
        out.setdefault("load_to_first_token_s", time.perf_counter() - t0)
        one(a.new_tokens)
        rates = []
        for _ in range(a.repeats):
            t1, tn = one(1), one(a.new_tokens)
            rates.append(batch * (a.new_tokens - 1) / max(tn - t1, 1e-9))
        return statistics.median(rates)

    for b in a.batches:
        out[f"decode_b{b}"] = rate(b)
    long = torch.tensor([rng.integers(3, config.vocab_size, a.prefill_tokens).tolist()],
                        device=a.device)
    out.update(time_prefill(lambda: model(long), a))
    return out


def bench_upstream(shape: str, a: argparse.Namespace) -> dict:
    """Upstream MiniMind's own ``model.generate`` (greedy) on the same weights: its
    ``model/model_minimind.py`` from a checkout given with --upstream (MiniMind-3 shapes) or
    --upstream-v2 (MiniMind2 shapes, e.g. rev c090b69). Nothing of it is shipped here."""
    import importlib

    import torch

    generation, hidden, layers, moe = SHAPES[shape]
    folder = a.upstream if generation == "minimind3" else a.upstream_v2
    if not folder:
        return {"skipped": f"no upstream checkout for {generation} (--upstream / --upstream-v2)"}
    sys.path.insert(0, str(Path(folder).resolve()))
    upstream = importlib.import_module("model.model_minimind")
    config = upstream.MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers, use_moe=moe)
    model = upstream.MiniMindForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in random_state(config_for(shape)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        return {"error": f"upstream's model does not take these weights: {missing[:3]} "
                         f"{unexpected[:3]}"}
    rng = np.random.default_rng(1)
    out: dict = {}
    for b in a.batches:
        ids = torch.tensor([rng.integers(3, 6400, a.prompt_tokens).tolist() for _ in range(b)])

        def one(n: int, ids=ids) -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(ids))
            return time.perf_counter() - t

        one(2)
        rates = [b * (a.new_tokens - 1) / max(one(a.new_tokens) - one(1), 1e-9)
                 for _ in range(a.repeats)]
        out[f"decode_b{b}"] = statistics.median(rates)
    return out


def bench_floor(shape: str, a: argparse.Namespace) -> dict:
    """A lower bound on time per token: one matrix-vector product per weight matrix, nothing else."""
    import torch

    # every 2-D weight once (the tied embedding stands for the head); dense shapes only
    mats = [torch.from_numpy(v).to(a.device) for v in random_state(config_for(shape)).values()
            if v.ndim == 2]
    xs = {m.shape[1]: torch.randn(m.shape[1], device=a.device) for m in mats}

    def token() -> None:
        for m in mats:
            m @ xs[m.shape[1]]
        sync(a.device)

    token()
    t = median_time(lambda: [token() for _ in range(20)], a.repeats) / 20
    return {"decode_b1": 1 / t}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    if a.impl == "matvec-floor":
        result = bench_floor(a.shape, a)
    elif a.impl.startswith("transformers"):
        result = bench_transformers(a.shape, a)
    elif a.impl == "upstream":
        result = bench_upstream(a.shape, a)
    else:
        result = bench_ours(a.shape, a)
    if a.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_all(impls: list[str], a: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Run every (impl, shape) in its own subprocess; returns their result dicts."""
    results = {}
    for shape in a.shapes:
        for impl in impls:
            cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--shape", shape,
                   "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads),
                   "--new-tokens", str(a.new_tokens), "--prompt-tokens", str(a.prompt_tokens),
                   "--prefill-tokens", str(a.prefill_tokens), "--repeats", str(a.repeats),
                   "--batches", *map(str, a.batches)]
            for flag in ("upstream", "upstream_v2"):
                if getattr(a, flag, None):
                    cmd += ["--" + flag.replace("_", "-"), getattr(a, flag)]
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + str(Path(__file__).parent)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                results[(shape, impl)] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                results[(shape, impl)] = json.loads(line[0][7:])
            print(f"  measured {shape} / {impl}", file=sys.stderr)
    return results


def table(results: dict, impls: list[str], a: argparse.Namespace, baseline: str) -> str:
    """A markdown table with one row per (shape, impl) and the ratio to ``baseline``."""
    cols = [f"decode_b{b}" for b in a.batches] + ["prefill_tok_s", "ttft_prefill_s",
                                                   "load_to_first_token_s"]
    mem = "peak_gpu_mb" if a.device.startswith("cuda") else "peak_rss_mb"
    head = ["model", "implementation"] + [f"decode tok/s b={b}" for b in a.batches] + [
        f"prefill tok/s ({a.prefill_tokens})", "TTFT (s)", "load→1st token (s)", mem.replace("_", " "),
        f"b=1 vs {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in a.shapes:
        base = results.get((shape, baseline), {}).get(cols[0])
        for impl in impls:
            r = results[(shape, impl)]
            if "error" in r or "skipped" in r or (impl == "matvec-floor"):
                if "decode_b1" in r:  # the floor row: one figure
                    r = {"skipped": f"{r['decode_b1']:.1f} tok/s at b=1 (weights read once)"}
                lines.append(f"| {shape} | {impl} | " + (r.get("error") or r["skipped"]) +
                             " |" * (len(head) - 2))
                continue
            cells = ["" if c not in r else f"{r[c]:.1f}" if "tok_s" in c or c.startswith("decode")
                     else f"{r[c]:.3f}" for c in cols]
            ratio = f"{r[cols[0]] / base:.2f}x" if base else "–"
            lines.append(f"| {shape} | {impl} | " + " | ".join(cells) +
                         f" | {r.get(mem, 0):.0f} | {ratio} |")
    return "\n".join(lines)


def parser(defaults: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours")
    p.add_argument("--shape", default="minimind2-small")
    p.add_argument("--shapes", nargs="+", default=defaults["shapes"], choices=list(SHAPES))
    p.add_argument("--device", default=defaults["device"])
    p.add_argument("--dtype", default=defaults["dtype"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=defaults["batches"])
    p.add_argument("--new-tokens", type=int, default=defaults["new_tokens"])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--upstream", default=None, metavar="DIR",
                   help="a checkout of jingyaogong/minimind (MiniMind-3): adds its model.generate")
    p.add_argument("--upstream-v2", default=None, metavar="DIR",
                   help="a MiniMind2 checkout of it (e.g. rev c090b69), for the MiniMind2 shapes")
    return p


if __name__ == "__main__":
    worker(parser({"shapes": [], "device": "cpu", "dtype": "float32", "batches": [1],
                   "new_tokens": 64}).parse_args())
