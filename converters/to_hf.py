"""Any MiniMind checkpoint → a transformers folder (``python -m converters.to_hf SRC DST``).

Dense MiniMind2 is exactly ``LlamaForCausalLM``, dense MiniMind-3 ``Qwen3ForCausalLM`` and
MiniMind-3-MoE ``Qwen3MoeForCausalLM`` (FORMATS.md), so the folder loads with stock
``AutoModelForCausalLM.from_pretrained`` and moves on to vLLM or any transformers server. Our
checkpoint names already are the hub's names (experts one by one, as on the hub; transformers 5
stacks them itself on load). MiniMind2-MoE has no stock class: it gets ``model_type`` "minimind"
and a README saying that only minimind-core (or upstream's own code) loads it.

reader (``load_checkpoint``) → normalise (optional LoRA merge, dtype) → writer (atomic folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minimind_core import __version__
from minimind_core.checkpoint import load_checkpoint
from minimind_core.config import ModelConfig, to_hf_config
from minimind_core.lora import load_lora, merge_into
from minimind_core.tokenizer import find_tokenizer

try:
    from .common import atomic_dir, copy_tokenizer
except ImportError:  # TEMPORARY until converters/common.py lands (then this block goes)
    import contextlib
    import os
    import shutil
    import tempfile

    @contextlib.contextmanager
    def atomic_dir(dst, force=False):
        dst = Path(dst)
        if dst.exists() and not force:
            raise FileExistsError(f"{dst} exists; pass --force to replace it")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            yield tmp
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def copy_tokenizer(src, dst):
        for f in Path(src).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
                                or f.suffix == ".jinja"):
                shutil.copy2(f, Path(dst) / f.name)

DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
WEIGHTS_FILE = "model.safetensors"

MINIMIND2_MOE_NOTE = """\
# {name} (MiniMind2-MoE)

MiniMind2-MoE (routed experts **plus shared experts**, top-{k} routing renormalised) has no
stock transformers architecture, so `config.json` says `model_type: "minimind"` and
`AutoModelForCausalLM` cannot load this folder by itself. Load it with minimind-core:

    from minimind_core import load
    engine = load("{name}")

or with upstream MiniMind's own `MiniMindForCausalLM` (jingyaogong/minimind, `model/model_minimind.py`).
Weights use upstream's names (`mlp.gate`, `mlp.experts.E.*`, `mlp.shared_experts.S.*`).
"""


def resolve_dtype(dtype: str | None, file_dtype: str = "float32") -> str:
    """The output dtype: None/"auto" keeps the source file's (float32 when it is something else)."""
    if dtype in (None, "auto"):
        return file_dtype if file_dtype in DTYPES else "float32"
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)} or auto")
    return name


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None,
            tokenizer: str | Path | None = None, lora: str | Path | None = None,
            force: bool = False, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write ``src`` (.pth, .safetensors, transformers or MLX folder) as a transformers folder.

    dtype: float32 / float16 / bfloat16, or None to keep the source's. tokenizer: a folder; by
    default found beside the weights or in upstream's ``model/``. lora: an upstream LoRA file
    merged (``W + B @ A``) before writing. overrides: ModelConfig fields (e.g. top-k). ``dst``
    is written atomically; an existing one needs ``force=True``. Returns ``dst``.
    """
    resolve_dtype(dtype)  # reject a bad dtype before any reading
    dst = Path(dst).expanduser()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (CLI: --force) to replace it")
    ckpt = load_checkpoint(src, **dict(overrides or {}))
    out_dtype = resolve_dtype(dtype, ckpt.file_dtype)
    weights = ckpt.weights
    adapter = None
    if lora is not None:
        adapter = load_lora(lora, ckpt.config)
        weights = merge_into(weights, adapter)
    tok = find_tokenizer(ckpt.path, tokenizer)
    config = hf_config(ckpt.config, out_dtype, source=ckpt.path, files=ckpt.files,
                       lora=adapter.path if adapter else None)
    with atomic_dir(dst, force) as tmp:
        write_safetensors(hf_weights(weights), tmp / WEIGHTS_FILE, out_dtype)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config(ckpt.config))
        copy_tokenizer(tok.path, tmp)
        if config["model_type"] == "minimind":
            (tmp / "README.md").write_text(MINIMIND2_MOE_NOTE.format(
                name=dst.name, k=ckpt.config.num_experts_per_tok), encoding="utf-8")
    return dst


def hf_config(config: ModelConfig, dtype: str, *, source: Path | None = None,
              files: Sequence[Path] = (), lora: Path | None = None) -> dict[str, Any]:
    """config.json: ``to_hf_config`` plus dtype, YaRN when switched on, and a provenance block."""
    out = to_hf_config(config)
    out["dtype"] = dtype
    yarn = config.yarn
    if yarn and "rope_scaling" not in out:
        out["rope_scaling"] = {"rope_type": "yarn", **{k: v for k, v in yarn.items() if k != "type"}}
    out["minimind"] = {
        "converter": f"minimind-core {__version__} converters.to_hf",
        "generation": config.generation,
        "kind": config.kind,
        "source": str(source) if source else None,
        "source_sha256": _sha256(files[0]) if len(files) == 1 and files[0].is_file() else None,
        "lora": str(lora) if lora else None,
    }
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- command line ---------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help=".pth / .safetensors file, transformers or MLX folder")
    parser.add_argument("dst", help="output folder (must not exist unless --force)")
    parser.add_argument("--dtype", default="auto",
                        help="float32, float16, bfloat16 or auto (the source's; default)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: found beside the weights)")
    parser.add_argument("--lora", help="upstream LoRA file to merge into the weights")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--top-k", type=int, dest="num_experts_per_tok",
                        help="MoE router top-k (not stored in .pth files)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(
        prog="python -m converters.to_hf", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    overrides = {"num_experts_per_tok": args.num_experts_per_tok} if args.num_experts_per_tok else {}
    try:
        dst = convert(args.src, args.dst, dtype=args.dtype, tokenizer=args.tokenizer,
                      lora=args.lora, force=args.force, overrides=overrides)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_type = json.loads((dst / "config.json").read_text())["model_type"]
    print(f"wrote {dst} (model_type {model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
