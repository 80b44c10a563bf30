"""``load()``: a checkpoint path (or the demo) → the Engine of the chosen backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .notes import note_once

if TYPE_CHECKING:
    from .engine import Engine

# Upstream's MiniMindConfig(flash_attn=...) picks F.scaled_dot_product_attention over its manual
# softmax(QK^T)V; both compute the same attention, and every backend here always runs its fused one.
FLASH_ATTN_NOTE = ("flash_attn={value} changes nothing here: attention always runs through the "
                   "backend's fused scaled-dot-product attention, which computes what upstream's "
                   "flash_attn=True and False both compute")


def load(path: str | Path | None = None, backend: str = "auto", device: str | None = None,
         dtype: str | None = None, tokenizer: str | Path | None = None,
         lora: str | Path | None = None, **overrides: Any) -> Engine:
    """Load a MiniMind model and return an Engine ready to generate.

    path: a ``.pth`` / ``.safetensors`` file, a transformers or MLX folder, or None for the
    embedded demo model. backend: "torch", "mlx" or "auto" (MLX on Apple silicon when installed,
    else torch). device: auto = cuda, then mps, then cpu. dtype: auto = bf16 on CUDA when supported
    (else fp16), fp32 on CPU. tokenizer: a folder; by default it is found beside the weights or in
    upstream's ``model/`` folder. lora: an upstream LoRA file applied unmerged. Any ModelConfig
    field (e.g. ``num_experts_per_tok=2``, ``inference_rope_scaling=True``) may be overridden.

    Upstream's ``MiniMindConfig`` switches are accepted too: ``use_moe=True/False`` states what
    the weights are (the weights decide; a contradiction is a ValueError naming both) and
    ``flash_attn`` changes nothing (a one-time warning says why).
    """
    import backends

    use_moe = overrides.pop("use_moe", None)
    if "flash_attn" in overrides:
        note_once(FLASH_ATTN_NOTE.format(value=overrides.pop("flash_attn")))
    if path is None:
        from .demo import demo_model_path

        path = demo_model_path()
    from .tokenizer import check_vocab

    engine_cls = backends.get(backend)
    engine = engine_cls.load(path, device=device, dtype=dtype, tokenizer=tokenizer, lora=lora,
                             **overrides)
    if use_moe is not None and bool(use_moe) != engine.config.use_moe:
        held = "a MoE model" if engine.config.use_moe else "a dense model (no experts)"
        raise ValueError(f"use_moe={use_moe!r}, but {path} holds {held}; drop use_moe (the "
                         f"weights decide) or load the {'dense' if use_moe else '_moe'} file")
    check_vocab(engine.tokenizer, engine.config.vocab_size)  # ids past the embedding: refuse now
    return engine
