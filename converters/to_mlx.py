"""Any MiniMind checkpoint → an mlx_lm folder (``python -m converters.to_mlx SRC DST``).

SRC: a ``.pth`` / ``.safetensors`` file or a transformers / MLX folder. DST gets ``config.json``
(model_type ``llama`` for dense MiniMind2, ``bailing_moe`` for MiniMind2-MoE, ``qwen3`` for dense
MiniMind-3, ``qwen3_moe`` for MiniMind-3-MoE: stock ``mlx_lm.load`` runs every one of them),
``model.safetensors`` (shards plus an index above 5 GiB), the tokenizer files with a chat
template that renders the same ids in stock mlx_lm as in minimind-core (``mlx_chat_template``),
and with ``--q-bits`` mlx_lm's quantization block.

MiniMind2-MoE is exactly mlx_lm's ``bailing_moe`` (rotate-half RoPE, softmax router whose top-k
weights are renormalised only when k > 1, ungated shared experts; ``ernie4_5_moe`` rotates
interleaved pairs and always renormalises, ``granitemoe`` has no shared expert), whose weight
names and fusions ``minimind_core.bailing.to_bailing_moe`` writes.

reader (``load_checkpoint``) → normalise (optional LoRA merge, dtype, quantize) → writer
(atomic: a temporary sibling folder renamed into place).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from minimind_core.bailing import BAILING_MOE, to_bailing_moe
from minimind_core.chat import FALLBACK_TEMPLATE
from minimind_core.checkpoint import load_checkpoint
from minimind_core.config import ModelConfig, to_hf_config
from minimind_core.dtypes import canonical_dtype
from minimind_core.lora import MLX_ADAPTER_CONFIG, MLX_ADAPTER_FILE, LoRA, load_lora
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

CONVERTER_VERSION = 1

def convert(src: str | Path, dst: str | Path, *, q_bits: int | None = None, q_group_size: int = 64,
            dtype: str = "float16", tokenizer: str | Path | Tokenizer | None = None,
            lora: str | Path | None = None, force: bool = False,
            overrides: Mapping[str, Any] | None = None, progress: bool = True,
            lora_adapter_out: str | Path | None = None) -> Path:
    """Write ``src`` as an mlx_lm-compatible folder at ``dst`` and return ``dst``.

    q_bits: 4 or 8 to quantize (None/0 = keep ``dtype``), with ``q_group_size`` 32/64/128.
    dtype: float16 (default, what mlx_lm users run), bfloat16 or float32. tokenizer: a folder;
    by default found beside the weights or in upstream's ``model/``. lora: an upstream LoRA file
    merged (``W + B @ A``) before converting. overrides: ModelConfig fields (e.g. top-k). DST
    is never an input, inside one or holding one; an existing ``dst`` needs ``force=True`` and
    must be an earlier output of ours; the folder appears only once complete
    (``common.atomic_dir``). progress: one line per step on stderr. lora_adapter_out: instead
    of merging ``lora``, write it as an mlx_lm adapter folder there
    (``mlx_lm.load(dst, adapter_path=lora_adapter_out)``), under the same rules.
    """
    from backends.mlx.load import build_model, check_quantization, parse_dtype, quantize

    # Every argument is checked before anything is read or written.
    dtype = canonical_dtype(dtype) if dtype is not None else "float16"
    bits = check_quantization(q_bits, q_group_size)
    if lora_adapter_out is not None and lora is None:
        raise ValueError("lora_adapter_out (--lora-adapter-out) needs the adapter: pass lora= (--lora)")
    src, dst = check_paths(src, dst, force, inputs=(tokenizer_input(src, tokenizer), lora))
    outputs = [dst] if lora_adapter_out is None else [dst, lora_adapter_out]
    if lora_adapter_out is not None:
        guard_output(lora_adapter_out, [src, tokenizer, lora, dst], force=force)
        guard_output(dst, [lora_adapter_out], force=force)
    say = Progress("to_mlx", enabled=progress)

    say(f"reading {display_path(src)}")
    ckpt = load_checkpoint(src, **dict(overrides or {}))
    tok = find_tokenizer(ckpt.path, tokenizer)
    check_vocab(tok, ckpt.config.vocab_size)
    for out in outputs:  # the tokenizer found is an input too
        guard_output(out, [src, tok, lora], force=force)
    adapter = None
    if lora_adapter_out is not None and ckpt.config.kind == "minimind2-moe":
        raise ValueError("MiniMind2-MoE's stock mlx_lm architecture (bailing_moe) fuses q/k/v, so "
                         "a LoRA on q_proj cannot be an mlx_lm adapter; merge it instead (drop "
                         "--lora-adapter-out)")
    if lora is not None:
        from minimind_core.lora import merge_into

        adapter = load_lora(lora, ckpt.config)
        if lora_adapter_out is None:
            say(f"merging LoRA {lora}")
            ckpt.weights = merge_into(ckpt.weights, adapter)
    say(f"building the MLX model ({ckpt.config.kind}, {ckpt.config.num_parameters() / 1e6:.1f}M "
        f"parameters) in {dtype}")
    model = build_model(ckpt, parse_dtype(dtype))
    quantization = None
    if bits is not None:
        say(f"quantizing to {bits} bits (group size {q_group_size})")
        quantization = quantize(model, bits, q_group_size)
    say(f"writing {display_path(dst)}")
    write_folder(model, dst, dtype=dtype, quantization=quantization, source=ckpt.path,
                 source_files=ckpt.files, tokenizer=tok, force=force, stock_layout=True,
                 lora=adapter.path if adapter is not None and lora_adapter_out is None else None)
    if lora_adapter_out is not None:
        say(f"writing the mlx_lm adapter folder {display_path(lora_adapter_out)}")
        write_adapter(adapter, ckpt.config, Path(lora_adapter_out).expanduser(), force=force)
    say.done(f"wrote {display_path(dst)} ({folder_size(dst) / 1e6:.1f} MB)")
    return dst


def write_folder(model: Any, dst: Path, *, dtype: str, quantization: Mapping[str, Any] | None = None,
                 source: Path | None = None, source_files: Sequence[Path] = (),
                 tokenizer: Tokenizer | None = None, force: bool = False,
                 lora: Path | None = None, stock_layout: bool = False) -> Path:
    """Write an MLX model (``backends.mlx.model.Model``) as a folder, atomically.

    stock_layout: write MiniMind2-MoE as mlx_lm's ``bailing_moe`` (what users get); without it
    the folder keeps this package's names (model_type ``minimind``), as the MLX cache of ``.pth``
    files does, which only this package reads.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from backends.mlx.load import save_weights

    config = mlx_config(model.args, dtype, quantization=quantization, source=source,
                        source_files=source_files, lora=lora, stock_layout=stock_layout)
    weights: Any = model
    if config["model_type"] == BAILING_MOE:
        weights = to_bailing_moe(dict(tree_flatten(model.parameters())), mx.concatenate)
    with atomic_dir(dst, force, writer="converters.to_mlx") as tmp:
        save_weights(weights, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
            write_chat_template(tmp, mlx_chat_template(tokenizer.chat_template))
    return dst


# Stock mlx_lm passes ``enable_thinking=<vocabulary has <think>>`` to every chat template that is
# not told otherwise: False for MiniMind2, whose template then appends an empty
# "<think>\n\n</think>\n\n" that upstream's prompts (eval_llm.py passes no such switch) never
# have. The folder's copy therefore pins the switch to "not given" for every reader.
PIN_THINKING = ("{#- converters.to_mlx: mlx_lm sends enable_thinking on every prompt; pinned to "
                "'not given', as upstream renders it -#}\n"
                "{%- set enable_thinking = minimind_not_given -%}\n")


def mlx_chat_template(template: str | None) -> str:
    """The chat template an MLX folder gets: stock mlx_lm then renders the ids our formatter
    renders. A tokenizer without one gets the formatter's plain fallback as a template; one that
    reads ``enable_thinking`` gets it pinned (``PIN_THINKING``)."""
    if template is None:
        return FALLBACK_TEMPLATE
    if "enable_thinking" in template and not template.startswith(PIN_THINKING):
        return PIN_THINKING + template
    return template


def write_chat_template(folder: Path, template: str) -> None:
    """Store ``template`` as the default chat template of the tokenizer copied into ``folder``
    (``chat_template.jinja`` when the copy has one, else tokenizer_config.json's chat_template)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(template, encoding="utf-8")
        return
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    named = config.get("chat_template")
    if isinstance(named, list):  # transformers' [{"name": ..., "template": ...}] form
        config["chat_template"] = [{**t, "template": template} if t.get("name") == "default"
                                   else t for t in named if isinstance(t, dict)]
    elif isinstance(named, dict):
        config["chat_template"] = {**named, "default": template}
    else:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")


def write_adapter(lora: str | Path | LoRA, config: ModelConfig, dst: str | Path,
                  force: bool = False) -> Path:
    """Write ``lora`` as an mlx_lm adapter folder (``adapters.safetensors`` + config), atomically.

    ``mlx_lm.load(mlx_folder, adapter_path=dst)`` then gives the output of our unmerged LoRA.
    """
    import mlx.core as mx

    from backends.mlx.lora import adapter_folder_contents

    lora = load_lora(lora, config)
    tensors, adapter_config = adapter_folder_contents(lora, config)
    with atomic_dir(dst, force, writer="converters.to_mlx") as tmp:
        mx.save_safetensors(str(tmp / MLX_ADAPTER_FILE), {k: mx.array(v) for k, v in tensors.items()},
                            metadata={"format": "mlx"})
        (tmp / MLX_ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n",
                                              encoding="utf-8")
    return Path(dst)


def mlx_config(config: Any, dtype: str, *, quantization: Mapping[str, Any] | None = None,
               source: Path | None = None, source_files: Sequence[Path] = (),
               lora: Path | None = None, stock_layout: bool = False) -> dict[str, Any]:
    """config.json: ``to_hf_config`` (``bailing_moe_config`` for MiniMind2-MoE with
    ``stock_layout``), mlx_lm's quantization block, and a ``minimind`` block.

    YaRN is an inference-time switch (``load(..., inference_rope_scaling=True)``) and is not
    written as ``rope_scaling``: stock mlx_lm's YaRN differs from upstream's (it scales attention).
    """
    stock_moe = stock_layout and config.kind == "minimind2-moe"
    out = bailing_moe_config(config) if stock_moe else to_hf_config(config)
    out["torch_dtype"] = dtype
    if quantization is not None:
        # mlx_lm writes the block twice (``quantization`` and, for HF tools, ``quantization_config``).
        out["quantization"] = dict(quantization)
        out["quantization_config"] = dict(quantization)
    out["minimind"] = provenance(
        "mlx", f"minimind-core {__version__} converters.to_mlx v{CONVERTER_VERSION}", config, dtype,
        source, source_files, lora, config_dict={k: v for k, v in config.to_dict().items()
                                                 if k not in ("inference_rope_scaling", "rope_scaling")})
    return out


def bailing_moe_config(config: ModelConfig) -> dict[str, Any]:
    """mlx_lm's ``bailing_moe`` config.json for a MiniMind2-MoE model (every switch it has set so
    that it computes MiniMind2-MoE: no biases, no q/k norm, softmax scores, one expert group,
    routed scaling 1, the shared experts one FFN of ``n_shared * ffn``)."""
    if config.num_attention_heads * config.head_dim != config.hidden_size:
        raise ValueError(f"bailing_moe takes head_dim = hidden_size / heads, but this model has "
                         f"{config.num_attention_heads} heads of {config.head_dim} on hidden "
                         f"{config.hidden_size}; stock mlx_lm cannot run it")
    ffn = config.intermediate_size
    return {
        "model_type": BAILING_MOE, "architectures": ["BailingMoeForCausalLM"],
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "intermediate_size": ffn, "moe_intermediate_size": ffn,
        "moe_shared_expert_intermediate_size": ffn, "num_experts": config.num_experts,
        "num_shared_experts": config.n_shared_experts,
        "moe_router_enable_shared_expert": config.n_shared_experts > 0,
        "num_experts_per_tok": config.num_experts_per_tok,
        # bailing renormalises when top_k > 1 and norm_topk_prob: MiniMind2's own rule
        "norm_topk_prob": config.norm_topk_prob, "first_k_dense_replace": 0,
        "score_function": "softmax", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "moe_router_enable_expert_bias": False,
        "use_bias": False, "use_qkv_bias": False, "use_qk_norm": False, "norm_head": False,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": True, "hidden_act": "silu",
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


# --- CLI ---------------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The converter's arguments (also used by ``minimind convert --to mlx``)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m converters.to_mlx",
        description="Convert a MiniMind checkpoint (.pth, .safetensors, transformers folder) "
                    "into a folder that mlx_lm and minimind-core load.")
    add_converter_args(parser, "the MLX folder to write")
    parser.add_argument("--q-bits", type=int, default=0, choices=(0, 4, 8),
                        help="quantize to 4 or 8 bits (0 = full precision, the default)")
    parser.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128),
                        help="quantization group size (default 64)")
    parser.add_argument("--dtype", default="float16",
                        help="dtype of the unquantized weights: float16 (fp16, half; the "
                             "default), bfloat16 (bf16) or float32 (fp32)")
    parser.add_argument("--lora-adapter-out", default=None, metavar="DIR",
                        help="with --lora: write it as an mlx_lm adapter folder instead of merging")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; errors are one line on stderr (exit 2 refused, 1 failed)."""
    return exit_status(lambda: convert(
        args.src, args.dst, q_bits=args.q_bits or None, q_group_size=args.q_group_size,
        dtype=args.dtype, tokenizer=args.tokenizer, lora=args.lora, force=args.force,
        progress=not args.quiet, lora_adapter_out=args.lora_adapter_out))


def main(argv: Sequence[str] | None = None) -> int:
    return run(configure_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
