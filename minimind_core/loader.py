"""``load()``: a checkpoint path (or the demo) → the Engine of the chosen backend."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine


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
    """
    import backends

    if path is None:
        from .demo import demo_model_path

        path = demo_model_path()
    from .tokenizer import check_vocab

    engine_cls = backends.get(backend)
    engine = engine_cls.load(path, device=device, dtype=dtype, tokenizer=tokenizer, lora=lora,
                             **overrides)
    check_vocab(engine.tokenizer, engine.config.vocab_size)  # ids past the embedding: refuse now
    return engine
