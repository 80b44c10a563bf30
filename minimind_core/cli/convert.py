"""``minimind convert --to mlx|hf|gguf SRC DST``: the converters in ``converters/``, from the CLI.

Same functions as ``python -m converters.to_mlx`` / ``python -m converters.to_hf``; every output
is written atomically by the converter (an existing DST needs ``--force``).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from . import common

TARGETS = {"mlx": "converters.to_mlx", "hf": "converters.to_hf", "gguf": "converters.to_gguf"}


def convert(to: str, src: str, dst: str, **options: Any) -> Any:
    """Run the ``to`` converter ("mlx" or "hf") with the options it takes."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose from {sorted(TARGETS)}")
    if to != "gguf" and options.get("outtype"):
        raise ValueError("--outtype is for --to gguf; use --dtype / --q-bits for the others")
    if to in ("hf", "gguf") and (options.get("q_bits") or options.get("q_group_size")
                                 or options.get("lora_adapter_out")):
        raise ValueError("--q-bits/--q-group-size/--lora-adapter-out are for --to mlx; a "
                         "transformers folder is written unquantized, with any LoRA fused "
                         "(gguf: --outtype q8_0)")
    if to == "mlx" and options.get("layout"):
        raise ValueError("--layout is for --to hf (which transformers class MiniMind2-MoE "
                         "becomes); an MLX folder has one layout")
    try:
        module = importlib.import_module(TARGETS[to])
    except ModuleNotFoundError as e:
        if e.name and TARGETS[to].startswith(e.name):
            raise ImportError(f"the {to} converter ({TARGETS[to]}) is not installed here") from e
        raise
    if to in ("hf", "gguf"):
        for key in ("q_bits", "q_group_size", "lora_adapter_out"):
            options.pop(key, None)
    return module.convert(src, dst, **options)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=sorted(TARGETS),
                        help="mlx: an mlx_lm folder; hf: a transformers folder; gguf: one .gguf file "
                             "for llama.cpp / Ollama")
    parser.add_argument("src", help="a .pth / .safetensors file or a transformers folder")
    parser.add_argument("dst", help="the folder to write")
    parser.add_argument("--q-bits", type=int, default=None, metavar="BITS",
                        help="mlx: quantize to 4 or 8 bits (default: no quantization)")
    parser.add_argument("--q-group-size", type=int, default=None, metavar="N",
                        help="mlx: quantization group size (default 64)")
    parser.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    parser.add_argument("--outtype", default=None, help="gguf: f32, f16, bf16, q8_0 or q4_0")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer folder (default: beside SRC or upstream's ../model)")
    parser.add_argument("--lora", default=None, metavar="PATH",
                        help="an upstream LoRA file to fuse into the weights")
    parser.add_argument("--lora-adapter-out", default=None, metavar="DIR",
                        help="mlx: write --lora as an mlx_lm adapter folder instead of fusing it")
    parser.add_argument("--layout", default=None, metavar="LAYOUT",
                        help="hf: stock (default; MiniMind2-MoE as GraniteMoeShared, for "
                             "transformers >= 4.49 and vLLM) or minimind (upstream's own layout)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    common.add_arch_args(parser, upstream_paths=False)


def main(args: argparse.Namespace) -> int:
    options = {"q_bits": args.q_bits, "q_group_size": args.q_group_size, "dtype": args.dtype,
               "tokenizer": args.tokenizer, "lora": args.lora,
               "lora_adapter_out": args.lora_adapter_out, "layout": args.layout,
               "outtype": args.outtype,
               "overrides": common.arch_overrides(args) or None}
    # Unset options are left out, so each converter's own defaults apply.
    options = {k: v for k, v in options.items() if v is not None}
    from converters.common import display_path, exit_status

    def run() -> None:
        out = convert(args.to, args.src, args.dst, force=args.force, **options)
        print(f"wrote {display_path(out if out is not None else args.dst)}", flush=True)

    # The converters' exit codes: 2 refused input, 1 failed write, 130 Ctrl-C, 143 SIGTERM.
    return exit_status(run, prog=common.PROG)
