"""Any MiniMind checkpoint → a transformers folder (``python -m converters.to_hf SRC DST``).

Every kind is written as the stock class that computes it exactly (FORMATS.md), so the folder
loads with stock ``AutoModelForCausalLM.from_pretrained`` and moves on to vLLM or any transformers
server: dense MiniMind2 as ``LlamaForCausalLM``, dense MiniMind-3 as ``Qwen3ForCausalLM``,
MiniMind-3-MoE as ``Qwen3MoeForCausalLM`` (our checkpoint names already are the hub's: experts
one by one, which transformers 5 stacks itself on load), and MiniMind2-MoE as
``GraniteMoeSharedForCausalLM`` (``minimind_core.granite`` holds that map). ``layout="minimind"``
writes MiniMind2-MoE in upstream's own ``model_type: "minimind"`` layout instead, for a
transformers older than GraniteMoeShared (only minimind-core or upstream's code loads it).

reader (``load_checkpoint``) → normalise (optional LoRA merge, dtype) → writer (atomic folder).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minimind_core.checkpoint import load_checkpoint
from minimind_core.config import ModelConfig, to_hf_config
from minimind_core.dtypes import DTYPE_NAMES, canonical_dtype
from minimind_core.granite import (
    ARCHITECTURE,
    MIN_TRANSFORMERS,
    check_expressible,
    granite_config,
    installed_transformers_too_old,
    to_granite,
)
from minimind_core.lora import load_lora, merge_into
from minimind_core.tokenizer import Tokenizer, check_vocab, find_tokenizer
from minimind_core.version import __version__

from .common import (
    Progress,
    add_converter_args,
    atomic_dir,
    check_paths,
    copy_tokenizer,
    display_path,
    exit_status,
    folder_size,
    guard_output,
    provenance,
    tokenizer_input,
)

_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
WEIGHTS_FILE = "model.safetensors"
# "stock": every kind as a stock transformers class; "minimind": MiniMind2-MoE in upstream's layout.
LAYOUTS = ("stock", "minimind")

GRANITE_NOTE = """\
# {name} (MiniMind2-MoE as GraniteMoeShared)

A MiniMind2-MoE model written by minimind-core as transformers' stock
`GraniteMoeSharedForCausalLM`, which computes the same network (top-{k} routing, {shared} shared
expert(s) of width {ff} concatenated into the shared MLP, every multiplier 1). Load it with
`transformers>={min_version}` (`AutoModelForCausalLM.from_pretrained("{name}")`), serve it with
`vllm serve {name}`, or load it with minimind-core (`minimind_core.load("{name}")`).

For an older transformers, convert again with `--layout minimind` (upstream's own layout, which
only minimind-core or upstream's code loads).
"""

MINIMIND2_MOE_NOTE = """\
# {name} (MiniMind2-MoE)

Written in upstream MiniMind's own layout (`--layout minimind`): `config.json` says
`model_type: "minimind"`, so stock `AutoModelForCausalLM` and vLLM cannot load this folder by
themselves (the default export, `GraniteMoeSharedForCausalLM`, can). Load it with minimind-core:

    from minimind_core.loader import load
    engine = load("{name}")

or with upstream MiniMind's own `MiniMindForCausalLM` (jingyaogong/minimind, `model/model_minimind.py`).
Weights use upstream's names (`mlp.gate`, `mlp.experts.E.*`, `mlp.shared_experts.S.*`).
"""


def resolve_dtype(dtype: str | None, file_dtype: str = "float32") -> str:
    """The output dtype: None/"auto" keeps the source file's (float32 when it is something else)."""
    if dtype in (None, "auto"):
        return file_dtype if file_dtype in DTYPE_NAMES else "float32"
    try:
        return canonical_dtype(dtype)
    except ValueError as e:
        raise ValueError(f"{e} or auto") from None


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None,
            tokenizer: str | Path | Tokenizer | None = None, lora: str | Path | None = None,
            force: bool = False, overrides: Mapping[str, Any] | None = None,
            layout: str = "stock", progress: bool = True) -> Path:
    """Write ``src`` (.pth, .safetensors, transformers or MLX folder) as a transformers folder.

    dtype: float32 / float16 / bfloat16, or None/"auto" to keep the source's. tokenizer: a folder;
    by default found beside the weights or in upstream's ``model/``. lora: an upstream LoRA file
    merged (``W + B @ A``) before writing. overrides: ModelConfig fields (e.g. top-k,
    ``inference_rope_scaling=True`` to write YaRN). layout: "stock" (default; MiniMind2-MoE as
    GraniteMoeShared, which needs transformers >= 4.49 where transformers is installed) or
    "minimind" (MiniMind2-MoE in upstream's layout). DST is never an input, inside one or holding
    one; an existing ``dst`` needs ``force=True`` and must be an earlier output of ours; the
    folder appears only once complete (``common.atomic_dir``). progress: one line per step on
    stderr. Returns ``dst``.
    """
    # Every argument is checked before anything is read or written.
    resolve_dtype(dtype)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    src, dst = check_paths(src, dst, force, inputs=(tokenizer_input(src, tokenizer), lora))
    say = Progress("to_hf", enabled=progress)

    say(f"reading {display_path(src)}")
    ckpt = load_checkpoint(src, **dict(overrides or {}))
    out_dtype = resolve_dtype(dtype, ckpt.file_dtype)
    tok = find_tokenizer(ckpt.path, tokenizer)
    granite = is_granite_export(ckpt.config, layout)
    check_vocab(tok, ckpt.config.vocab_size)
    guard_output(dst, [src, tok, lora], force=force)  # the tokenizer found is an input too
    weights, adapter = ckpt.weights, None
    if lora is not None:
        say(f"merging LoRA {lora}")
        adapter = load_lora(lora, ckpt.config)
        weights = merge_into(weights, adapter)
    config = hf_config(ckpt.config, out_dtype, source=ckpt.path, files=ckpt.files,
                       lora=adapter.path if adapter else None, granite=granite)
    say(f"writing {display_path(dst)} ({config['architectures'][0]}, {out_dtype})")
    with atomic_dir(dst, force, writer="converters.to_hf") as tmp:
        tensors = to_granite(weights, ckpt.config) if granite else hf_weights(weights)
        write_safetensors(tensors, tmp / WEIGHTS_FILE, out_dtype)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(ckpt.config))
        copy_tokenizer(tok, tmp)
        if granite:
            (tmp / "README.md").write_text(GRANITE_NOTE.format(
                name=display_path(dst.name), k=ckpt.config.num_experts_per_tok,
                ff=ckpt.config.intermediate_size, shared=ckpt.config.n_shared_experts,
                min_version=MIN_TRANSFORMERS), encoding="utf-8")
        elif config["model_type"] == "minimind":
            (tmp / "README.md").write_text(MINIMIND2_MOE_NOTE.format(
                name=display_path(dst.name), k=ckpt.config.num_experts_per_tok), encoding="utf-8")
    say.done(f"wrote {display_path(dst)} ({folder_size(dst) / 1e6:.1f} MB)")
    return dst


def is_granite_export(config: ModelConfig, layout: str = "stock") -> bool:
    """Whether ``config`` is written as GraniteMoeShared; raises ValueError when it should be but
    cannot be (routing Granite cannot express, a transformers here older than the class), and
    for ``layout="minimind"`` on a kind that has no other layout."""
    if config.kind != "minimind2-moe":
        if layout != "stock":
            raise ValueError(f"layout={layout!r} is for MiniMind2-MoE only; a {config.kind} model "
                             f"is always written as its stock transformers class")
        return False
    if layout == "minimind":
        return False
    check_expressible(config)
    too_old = installed_transformers_too_old()
    if too_old:
        raise ValueError(f"the transformers installed here ({too_old}) predates {ARCHITECTURE}, "
                         f"the stock class of a MiniMind2-MoE export: upgrade it (pip install -U "
                         f"'transformers>={MIN_TRANSFORMERS}'), or export upstream's own layout "
                         f"with layout='minimind' (CLI: --layout minimind)")
    return True


def hf_config(config: ModelConfig, dtype: str, *, source: Path | None = None,
              files: Sequence[Path] = (), lora: Path | None = None,
              granite: bool = False) -> dict[str, Any]:
    """config.json: ``to_hf_config`` (or ``granite_config`` when ``granite``) plus dtype, YaRN when
    switched on, and a ``minimind`` block.

    transformers' YaRN equals upstream's (FORMATS.md) with ``attention_factor`` 1.0, so a model
    loaded with ``inference_rope_scaling=True`` is exported with it.
    """
    out = granite_config(config) if granite else to_hf_config(config)
    out["dtype"] = dtype
    yarn = config.yarn
    if yarn and "rope_scaling" not in out:
        out["rope_scaling"] = {"rope_type": "yarn", **{k: v for k, v in yarn.items() if k != "type"}}
        out["inference_rope_scaling"] = True  # upstream's own switch, so our reader turns it on
    out["minimind"] = provenance("hf", f"minimind-core {__version__} converters.to_hf", config,
                                 dtype, source, files, lora)
    return out


def generation_config(config: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id}


def hf_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint names are the hub's; the head is tied, so only the embedding is stored."""
    return {k: v for k, v in weights.items() if k != "lm_head.weight"}


# --- writing --------------------------------------------------------------------------------------

def write_safetensors(tensors: Mapping[str, np.ndarray], path: Path, dtype: str = "float32",
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write numpy tensors as one safetensors file in ``dtype`` (bf16 rounded to nearest even).

    numpy has no bf16, hence this small writer instead of ``safetensors.numpy``.
    """
    st_dtype = _ST_NAMES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = _encode(np.asarray(tensors[name]), dtype)
        header[name] = {"dtype": st_dtype, "shape": list(np.shape(tensors[name])),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    return path


def _encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded[np.isnan(arr)] = 0x7FC0
        return rounded.astype("<u2").tobytes()
    return np.ascontiguousarray(arr, dtype="<f4" if dtype == "float32" else "<f2").tobytes()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- command line ---------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The converter's arguments (also used by ``minimind convert --to hf``)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m converters.to_hf",
        description="Convert a MiniMind checkpoint (.pth, .safetensors, transformers or MLX "
                    "folder) into a folder that transformers' AutoModelForCausalLM loads.")
    add_converter_args(parser, "the transformers folder to write")
    parser.add_argument("--dtype", default="auto",
                        help="float32 (fp32), float16 (fp16, half), bfloat16 (bf16) or auto "
                             "(default: the source's)")
    parser.add_argument("--layout", choices=LAYOUTS, default="stock",
                        help="stock (default): MiniMind2-MoE as GraniteMoeSharedForCausalLM "
                             "(transformers >= 4.49, vLLM); minimind: MiniMind2-MoE in upstream's "
                             "own layout, for an older transformers")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; errors are one line on stderr (exit 2 refused, 1 failed)."""
    return exit_status(lambda: convert(
        args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer, lora=args.lora,
        force=args.force, layout=args.layout, progress=not args.quiet))


def main(argv: Sequence[str] | None = None) -> int:
    return run(configure_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
