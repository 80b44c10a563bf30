"""``minimind info``: what was detected from a checkpoint (and a LoRA), without loading a backend.

A quantized MLX folder (packed weights hide their shapes) is read with the mlx backend; ``--backend
NAME`` loads any model through that backend and reports what it loaded.

A LoRA given with ``--lora PATH`` or upstream's ``--lora_weight NAME`` is read and checked against
the checkpoint's architecture, as ``generate`` would before applying it: one that does not fit is
an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint, mlx_quantization
from ..config import ModelConfig
from ..lora import load_lora
from ..tokenizer import find_tokenizer
from . import common

DEMO_NOTE = ("DEMO MODEL: a tiny model trained by examples/train_demo_model.py so the tools work "
             "offline; it is not a MiniMind release. Pass --model for your own weights.")


def describe_checkpoint(path: str | Path, tokenizer: str | Path | None = None,
                        lora: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Everything ``info`` reports about a checkpoint, as a JSON-ready dict.

    ``lora`` is read and validated against the checkpoint's config (LoraError when it does not
    fit); its description is under ``"lora"`` (None without one).
    """
    ckpt = load_checkpoint(path, **overrides)
    out = describe_config(ckpt.config, ckpt.source_config, overrides)
    out.update(path=str(ckpt.path), file_dtype=ckpt.file_dtype, file_size=ckpt.file_size,
               files=[str(f) for f in ckpt.files], backend=None, quantization=None,
               lora=describe_lora(lora, ckpt.config) if lora is not None else None)
    try:
        tok = find_tokenizer(ckpt.path, tokenizer)
        out.update(tokenizer=str(tok.path), chat_template=tok.chat_template is not None,
                   tokenizer_error=None)
    except (FileNotFoundError, ValueError) as e:
        if tokenizer is not None:
            raise  # the one the user named must work
        out.update(tokenizer=None, chat_template=False, tokenizer_error=str(e).splitlines()[0])
    return out


def describe_loaded(path: str | Path, backend: str, tokenizer: str | Path | None = None,
                    lora: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """``describe_checkpoint``'s dict for a model loaded through ``backend`` (what a quantized
    MLX folder needs: its packed weights hide their shapes, so only the MLX backend reads it)."""
    from ..loader import load

    path = Path(path)
    engine = load(path, backend=backend, tokenizer=tokenizer, **overrides)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    source = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = describe_config(engine.config, source, overrides)
    out.update(path=str(path), file_dtype=engine.info.get("file_dtype"),
               file_size=sum(f.stat().st_size for f in files), files=[str(f) for f in files],
               backend=engine.backend, quantization=engine.info.get("quantization"),
               lora=describe_lora(lora, engine.config) if lora is not None else None,
               tokenizer=str(engine.tokenizer.path),
               chat_template=engine.tokenizer.chat_template is not None, tokenizer_error=None)
    return out


def describe_config(c: ModelConfig, source_config: dict[str, Any] | None,
                    overrides: dict[str, Any]) -> dict[str, Any]:
    """The architecture part of ``info``'s dict (``source_config``: the config.json read, if any)."""
    source = source_config or {}
    total = c.num_parameters()
    idle = c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * \
        c.intermediate_size if c.use_moe else 0
    return {
        "demo": bool(source.get("demo", False)),
        "generation": c.generation,
        "moe": c.use_moe,
        "kind": c.kind,
        "parameters": total,
        "active_parameters": total - idle,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        # MiniMind2 weights cannot tell the head count; say when it is the assumed default.
        "num_attention_heads_assumed": c.generation == "minimind2" and not (
            {"num_attention_heads", "n_heads"} & set(source) or "num_attention_heads" in overrides),
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "num_experts": c.num_experts,
        "num_experts_per_tok": c.num_experts_per_tok if c.use_moe else 0,
        "n_shared_experts": c.n_shared_experts,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": c.yarn,
    }


def describe_lora(path: str | Path, config: ModelConfig) -> dict[str, Any]:
    """A LoRA checked against ``config``: its path, rank(s), module count and dtype in the file."""
    adapter = load_lora(path, config)
    return {"path": str(adapter.path if adapter.path is not None else path),
            "rank": adapter.rank,
            "ranks": sorted(set(adapter.ranks.values())),
            "modules": len(adapter),
            "file_dtype": adapter.file_dtype}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def format_info(d: dict[str, Any]) -> str:
    """The human-readable report."""
    gen = {"minimind2": "MiniMind2", "minimind3": "MiniMind-3"}[d["generation"]]
    heads = f"{d['num_attention_heads']}"
    if d["num_attention_heads_assumed"]:
        heads += " (assumed; MiniMind2 files cannot tell it: --num-attention-heads N)"
    rows = [
        ("path", d["path"]),
        ("model", f"{gen} {'MoE' if d['moe'] else 'dense'}"),
        ("parameters", _count(d["parameters"]) + (
            f" ({_count(d['active_parameters'])} active per token)" if d["moe"] else "")),
        ("hidden size", d["hidden_size"]),
        ("layers", d["num_hidden_layers"]),
        ("heads", heads),
        ("kv heads", d["num_key_value_heads"]),
        ("head dim", d["head_dim"]),
        ("FFN", d["intermediate_size"]),
        ("experts", f"{d['num_experts']} routed, top-{d['num_experts_per_tok']}, "
                    f"{d['n_shared_experts']} shared" if d["moe"] else "none (dense)"),
        ("vocab", d["vocab_size"]),
        ("tied head", "yes" if d["tie_word_embeddings"] else "no"),
        ("context", f"{d['max_position_embeddings']} tokens, rope theta {d['rope_theta']:g}, "
                    f"YaRN {_yarn(d['rope_scaling'])}"),
        ("rms eps", f"{d['rms_norm_eps']:g}"),
        ("dtype in file", d["file_dtype"] if not d.get("quantization") else
         f"{d['quantization']['bits']}-bit (group size {d['quantization']['group_size']})"),
        ("file size", _size(d["file_size"])),
        ("tokenizer", f"{d['tokenizer']} (chat template: {'yes' if d['chat_template'] else 'no'})"
                      if d["tokenizer"] else f"not found: {d['tokenizer_error']}"),
    ]
    if d.get("lora"):
        lora = d["lora"]
        rows.append(("lora", f"{lora['path']} (rank {'/'.join(map(str, lora['ranks']))}, "
                             f"{lora['modules']} modules, {lora['file_dtype']})"))
    if d.get("backend"):
        rows.insert(1, ("read by", f"the {d['backend']} backend"))
    width = max(len(k) for k, _ in rows)
    lines = [DEMO_NOTE] if d["demo"] else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _yarn(scaling: dict[str, Any] | None) -> str:
    """YaRN as info shows it: the factor and the context it stretches."""
    if not scaling:
        return "off (--inference-rope-scaling: factor 16 over 2048 positions)"
    return (f"on: factor {scaling['factor']:g} over {scaling['original_max_position_embeddings']} "
            f"original positions")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help="the checkpoint (same as --model; default: the embedded demo model)")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--backend", default=None,
                        help="load the model with this backend (torch, mlx, auto) and report what "
                             "it loaded (default: read the file without one; a quantized MLX "
                             "folder is read with mlx)")
    common.add_model_args(parser, runtime=False)


def main(args: argparse.Namespace) -> int:
    if args.path is not None:
        if args.model is not None:
            raise ValueError("give the checkpoint once: as PATH or as --model, not both")
        args.model = args.path
    model, lora, tokenizer = common.model_location(args)
    path = model or common.demo_weights()
    backend = args.backend
    if backend is None and path.is_dir() and mlx_quantization(path):
        backend = "mlx"  # packed weights: only the MLX backend can read them
    if backend is None:
        d = describe_checkpoint(path, tokenizer, lora, **common.arch_overrides(args))
    else:
        d = describe_loaded(path, common.resolve_backend(backend), tokenizer, lora,
                            **common.arch_overrides(args))
    print(json.dumps(d, ensure_ascii=False, indent=2) if args.json else format_info(d))
    return 0
