"""Weight-only int8 / int4 quantization of a loaded model: ``load(..., quantize=8, q_group_size=64)``.

Every linear weight (the fused q/k/v and gate/up, o_proj, down_proj, the MoE router and experts)
and the token embedding (the tied head) are quantized per group of ``q_group_size`` inputs with
``quant.quantize_weight`` (llama.cpp's q8_0 / q4_0 arithmetic; 4 bits with searched scales, which
keep the float32 logits closer on every model measured: benchmarks/bench_quant_quality.py), as
the MLX backend quantizes every Linear and Embedding. Two views of the result are kept: the
packed ``QuantWeight`` on the module (``module.quant``), which the native CPU decode step
multiplies with the int8 kernels, and the float weight overwritten by its dequantized values,
which prefill and the eager/compiled steps use — so every path computes with the same quantized
weights.
"""

from __future__ import annotations

import torch

from .model import MLP, MiniMindForCausalLM, MoE
from .quant import BITS, GROUP_SIZES, QuantWeight, quantize_weight


def check_quantization(bits: int | None, group_size: int | None) -> tuple[int, int] | None:
    """(bits, group size) for ``quantize=``/``q_group_size=``, None for full precision."""
    if not bits:
        if group_size:
            raise ValueError("q_group_size is given without quantize=8 or 4")
        return None
    group_size = 64 if group_size is None else group_size
    if bits not in BITS:
        raise ValueError(f"quantize must be 8 or 4 (None = full precision), got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"q_group_size must be 32, 64 or 128, got {group_size!r}")
    return bits, group_size


@torch.no_grad()
def _quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantWeight:
    q = quantize_weight(weight.detach().float().cpu().contiguous(), bits, group_size,
                        scale_search=bits == 4)
    weight.copy_(q.dequantize().to(device=weight.device, dtype=weight.dtype))
    return q


def quantize_model(model: MiniMindForCausalLM, bits: int, group_size: int) -> dict:
    """Quantize ``model`` in place (after ``fuse``); returns the config block for ``info``."""
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.quant = {"wqkv": _quantize(attn.wqkv, bits, group_size),
                      "o_proj": _quantize(attn.o_proj.weight, bits, group_size)}
        mlp = layer.mlp
        mlps = [mlp] if isinstance(mlp, MLP) else [*mlp.experts, *mlp.shared_experts]
        for m in mlps:
            m.quant = {"w13": _quantize(m.w13, bits, group_size),
                       "down_proj": _quantize(m.down_proj.weight, bits, group_size)}
        if isinstance(mlp, MoE):
            mlp.quant = {"gate": _quantize(mlp.gate.weight, bits, group_size)}
    model.quant = {"embed": _quantize(model.model.embed_tokens.weight, bits, group_size)}
    kind = "q8_0-style, per group" if bits == 8 else "q4_0-style, per group, searched scales"
    return {"bits": bits, "group_size": group_size, "kind": kind}
