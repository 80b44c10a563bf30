"""Any MiniMind checkpoint → one GGUF file for llama.cpp and Ollama (``python -m converters.to_gguf``).

``python -m converters.to_gguf SRC OUT.gguf [--outtype f32|f16|bf16|q8_0|q4_0] [--lora L]
[--tokenizer DIR] [--force]`` writes a self-contained ``OUT.gguf`` (weights, tokenizer, chat
template, metadata) with llama.cpp's own ``gguf`` package, and an Ollama ``OUT.Modelfile`` beside
it. The architecture mapping is in ``gguf_arch.py``, the tokenizer metadata in ``gguf_vocab.py``,
the Modelfile in ``ollama.py``.

reader (``load_checkpoint``: .pth, safetensors, transformers and MLX folders) → normalise
(optional LoRA merge, then the q/k permutation) → writer (atomic: a temporary sibling renamed
into place, for both files).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from minimind_core.checkpoint import load_checkpoint
from minimind_core.config import ModelConfig
from minimind_core.dtypes import canonical_dtype
from minimind_core.tokenizer import Tokenizer, find_tokenizer
from minimind_core.version import __version__

from .common import (
    TOKENIZER_FILES,
    Progress,
    add_converter_args,
    atomic_file,
    check_paths,
    exit_status,
    sha256_files,
    tokenizer_input,
)

CONVERTER_VERSION = 1
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCKED = {"q8_0": "Q8_0", "q4_0": "Q4_0"}  # llama.cpp's block-quantized outtypes
# ``minimind convert --dtype`` speaks torch's names; they mean the same outtypes here.
_DTYPE_TO_OUTTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF needs llama.cpp's gguf package: "
                          "pip install 'minimind-core[gguf]'") from None
    return gguf


def modelfile_path(out: Path) -> Path:
    """Where the Modelfile of ``out`` goes: ``model.gguf`` → ``model.Modelfile`` beside it."""
    return out.with_suffix(".Modelfile")


def resolve_outtype(outtype: str | None, dtype: str | None = None) -> str:
    """``outtype`` (f32, f16, bf16, q8_0, q4_0), or the same choice as a torch dtype name."""
    if outtype is not None and dtype is not None:
        raise ValueError("pass outtype (--outtype) or dtype (--dtype), not both")
    if dtype is not None:
        return _DTYPE_TO_OUTTYPE[canonical_dtype(dtype)]
    value = "f32" if outtype is None else str(outtype).lower()
    if value not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    return value


def convert(src: str | Path, dst: str | Path, *, outtype: str | None = None,
            dtype: str | None = None, tokenizer: str | Path | Tokenizer | None = None,
            lora: str | Path | None = None, force: bool = False,
            overrides: Mapping[str, Any] | None = None, progress: bool = True) -> Path:
    """Write ``src`` as the GGUF file ``dst`` (plus ``dst.Modelfile``) and return ``dst``.

    outtype: f32 (default; exact), f16, bf16, q8_0 or q4_0 (1-D tensors and the MoE router stay
    f32; a matrix whose rows the block size does not divide falls back to f16); ``dtype`` is the same choice in
    torch's names. tokenizer: a folder (default: beside the weights or upstream's ``model/``).
    lora: an upstream LoRA file merged (``W + B @ A``) first. overrides: ModelConfig fields (e.g.
    top-k, ``inference_rope_scaling=True`` to write YaRN). Existing files need ``force=True``;
    each appears only once complete. progress: one line per step on stderr.
    """
    gguf = _gguf()
    from . import gguf_arch, gguf_vocab, ollama

    # Every argument is checked before anything is read or written.
    kind = resolve_outtype(outtype, dtype)
    inputs = (tokenizer_input(src, tokenizer), lora)
    src, dst = check_paths(src, dst, force, inputs, folder=False)
    if dst.suffix.lower() != ".gguf":
        raise ValueError(f"{dst}: the output is one file named *.gguf (e.g. model.gguf)")
    side = modelfile_path(dst)
    check_paths(src, side, force, inputs, folder=False)
    say = Progress("to_gguf", enabled=progress)

    say(f"reading {src}")
    ckpt = load_checkpoint(src, **dict(overrides or {}))
    config = ckpt.config
    arch = gguf_arch.architecture(config)
    tok = find_tokenizer(ckpt.path, tokenizer)
    _refuse_inputs(dst, side, tok, lora)
    vocab = gguf_vocab.build_vocab(tok, config.vocab_size)
    weights, adapter = ckpt.weights, None
    if lora is not None:
        from minimind_core.lora import load_lora, merge_into

        say(f"merging LoRA {lora}")
        adapter = load_lora(lora, config)
        weights = merge_into(weights, adapter)  # before the q/k permutation

    say(f"writing {dst} ({arch}, {kind})")
    with atomic_file(dst, force) as tmp_gguf, atomic_file(side, force) as tmp_side:
        writer = gguf.GGUFWriter(tmp_gguf, arch)
        try:
            _write_metadata(writer, gguf, config, kind, name=dst.stem, source=ckpt.path,
                            files=ckpt.files, lora=adapter.path if adapter else None)
            gguf_arch.write_hparams(writer, config)
            vocab.write(writer)
            fallbacks = 0
            for name, tensor, arr in gguf_arch.gguf_tensors(config, weights):
                data, qtype = _encode(gguf, arr, kind, tensor in gguf_arch.F32_TENSORS)
                fallbacks += kind in BLOCKED and qtype == gguf.GGMLQuantizationType.F16
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        stops = [tok.id_to_token(i) for i in sorted(tok.stop_token_ids)]  # eos, <|im_end|>, …
        tmp_side.write_text(ollama.modelfile(dst.name, config, stops), encoding="utf-8")
    if fallbacks:
        say(f"{fallbacks} matrices whose rows are not a multiple of 32 were written as f16")
    say.done(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB) and {side.name}")
    return dst


def _refuse_inputs(dst: Path, side: Path, tok: Tokenizer, lora: str | Path | None) -> None:
    """Neither output may land on the LoRA or on a tokenizer file we read."""
    inputs = {(tok.path / name).resolve() for name in TOKENIZER_FILES}
    if lora is not None:
        inputs.add(Path(lora).expanduser().resolve())
    for out in (dst, side):
        if out.resolve() in inputs:
            raise ValueError(f"{out} is one of the inputs (tokenizer or LoRA); pick another name")


def _write_metadata(writer: Any, gguf: Any, config: ModelConfig, kind: str, *, name: str,
                    source: Path, files: Sequence[Path], lora: Path | None) -> None:
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    if kind in BLOCKED:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # provenance, as the ``minimind`` block of our other converters' config.json
    writer.add_string("minimind.converter",
                      f"minimind-core {__version__} converters.to_gguf v{CONVERTER_VERSION}")
    writer.add_string("minimind.kind", config.kind)
    writer.add_string("minimind.source", str(source))
    existing = [f for f in files if Path(f).is_file()]
    if existing:
        writer.add_string("minimind.source_sha256", sha256_files(existing))
    if lora is not None:
        writer.add_string("minimind.lora", str(lora))


def _encode(gguf: Any, arr: np.ndarray, kind: str, keep_f32: bool) -> tuple[np.ndarray, Any]:
    """One tensor in the outtype; 1-D tensors and ``keep_f32`` ones stay float32."""
    Q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or keep_f32 or kind == "f32":
        return arr.astype(np.float32), Q.F32
    if kind in BLOCKED:
        qtype = getattr(Q, BLOCKED[kind])
        if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return gguf.quants.quantize(arr, qtype), qtype
    if kind == "bf16":
        return gguf.quants.quantize(arr, Q.BF16), Q.BF16
    return arr.astype(np.float16), Q.F16  # f16, and the blocks' fallback (as convert_hf_to_gguf.py)


# --- command line ---------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The converter's arguments."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m converters.to_gguf",
        description="Convert a MiniMind checkpoint (.pth, .safetensors, transformers or MLX "
                    "folder) into one GGUF file for llama.cpp and Ollama, with a Modelfile.")
    add_converter_args(parser, "the .gguf file to write (OUT.Modelfile is written beside it)")
    parser.add_argument("--outtype", default="f32", choices=OUTTYPES,
                        help="f32 (exact, the default), f16, bf16, q8_0 or q4_0")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; errors are one line on stderr and exit status 1."""
    return exit_status(lambda: convert(
        args.src, args.dst, outtype=args.outtype, tokenizer=args.tokenizer, lora=args.lora,
        force=args.force, progress=not args.quiet))


def main(argv: Sequence[str] | None = None) -> int:
    return run(configure_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
