"""Fold an upstream LoRA into its base model: ``python -m converters.merge_lora BASE LORA DST``.

The result (``W' = W + B @ A`` on every LoRA module, computed in float32) loads without the
adapter and gives the same logits as the base model with the adapter applied. DST's form follows
its name: ``*.safetensors`` (default), ``*.pth`` (a plain state dict as upstream saves, usable by
upstream's scripts), or a folder (a transformers folder with config and tokenizer, as
``converters.to_hf --lora`` writes). Keep DST in upstream's ``out/`` folder and the tokenizer in
``model/`` is found as for any checkpoint there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from minimind_core.checkpoint import TORCH_SUFFIXES, load_checkpoint
from minimind_core.lora import load_lora, merge_into

from . import to_hf
from .common import atomic_file, check_paths, display_path, exit_status

FORMATS = ("safetensors", "pth", "hf")
# a torch file under any name the readers accept as one (.pth .pt .bin .ckpt)
_SUFFIXES = {".safetensors": "safetensors", **{s: "pth" for s in TORCH_SUFFIXES}}


def output_format(dst: Path, fmt: str | None) -> str:
    """``fmt`` if given, else from DST's suffix (.safetensors / .pth / none → a folder)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
        return fmt
    if dst.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[dst.suffix.lower()]
    if dst.suffix:
        raise ValueError(f"{dst}: unknown output type {dst.suffix!r}; name it *.safetensors or "
                         f"*.pth, or give a folder name for a transformers folder")
    return "hf"


def merge(base: str | Path, lora: str | Path, dst: str | Path, *, fmt: str | None = None,
          dtype: str | None = None, tokenizer: str | Path | None = None, force: bool = False,
          overrides: Mapping[str, Any] | None = None) -> Path:
    """Write BASE with LORA merged to DST and return DST.

    fmt: "safetensors", "pth" or "hf" (a transformers folder); default from DST's suffix.
    dtype: float32 / float16 / bfloat16, default the base file's. The LoRA is validated against
    the base before anything is written. DST is never an input (or inside one); an existing DST
    is replaced only with ``force=True`` (a file, or a folder of ours), atomically.
    """
    dst = Path(dst).expanduser()
    fmt = output_format(dst, fmt)
    to_hf.resolve_dtype(dtype)
    if fmt == "hf":
        return to_hf.convert(base, dst, dtype=dtype, tokenizer=tokenizer, lora=lora, force=force,
                             overrides=overrides)
    # DST is never BASE, the LoRA or inside them; an existing file needs force (common.py).
    base, dst = check_paths(base, dst, force, inputs=(lora, tokenizer), folder=False)
    ckpt = load_checkpoint(base, **dict(overrides or {}))
    adapter = load_lora(lora, ckpt.config)
    weights = merge_into(ckpt.weights, adapter)
    out_dtype = to_hf.resolve_dtype(dtype, ckpt.file_dtype)
    with atomic_file(dst, force) as tmp:  # a crash or a full disk leaves DST as it was
        if fmt == "safetensors":
            meta = {"minimind_base": display_path(ckpt.path),
                    "minimind_lora": display_path(adapter.path)}
            to_hf.write_safetensors(to_hf.hf_weights(weights), tmp, out_dtype, meta)
        else:
            _save_pth(weights, tmp, out_dtype)
    return dst


def _save_pth(weights: Mapping[str, Any], path: Path, dtype: str) -> None:
    try:
        import torch
    except ImportError:
        raise ImportError("writing a .pth needs torch (pip install torch, the CPU wheel is "
                          "enough); or write .safetensors instead") from None
    torch_dtype = getattr(torch, dtype)
    state = {k: torch.from_numpy(v.copy()).to(torch_dtype) for k, v in weights.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as upstream saves it
    with open(path, "wb") as f:  # through a Python file, so a full disk surfaces as its OSError
        torch.save(state, f)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.merge_lora",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base model: .pth / .safetensors / transformers folder")
    parser.add_argument("lora", help="upstream LoRA file (out/lora/NAME_HIDDEN.pth)")
    parser.add_argument("dst", help="output: *.safetensors, *.pth, or a folder (transformers)")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, help="override DST's suffix")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    parser.add_argument("--tokenizer", help="tokenizer folder (for a transformers folder)")
    parser.add_argument("--force", action="store_true",
                        help="replace DST (a file, or a folder this converter wrote)")
    args = parser.parse_args(argv)
    # One line on stderr for every failure: exit 2 refused, 1 failed, 130 Ctrl-C, 143 SIGTERM.
    return exit_status(lambda: print("wrote", display_path(merge(
        args.base, args.lora, args.dst, fmt=args.fmt, dtype=args.dtype, tokenizer=args.tokenizer,
        force=args.force)), flush=True))


if __name__ == "__main__":
    sys.exit(main())
