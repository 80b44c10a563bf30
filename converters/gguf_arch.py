"""How each MiniMind kind maps onto an architecture llama.cpp already runs (GGUF metadata + tensors).

minimind2 → ``llama``; minimind2-moe → ``granitemoe`` (softmax router, top-k renormalised, one
ungated shared FFN, Granite's scales left neutral); minimind3 → ``qwen3``; minimind3-moe →
``qwen3moe``. The other candidates are not exact: ``llama`` ignores shared-expert tensors,
``qwen2moe`` gates the shared expert and does not renormalise, ``deepseek`` does not renormalise.

Every fact here is llama.cpp's (its ``src/models/*.cpp`` and gguf-py's names), written once: the
tensor names come from gguf-py's ``TENSOR_NAMES``; only the choice of which of our checkpoint
tensors feeds which GGUF tensor, and the few transforms (q/k permutation, expert stacking, shared
experts concatenated), live in this file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np

from minimind_core.config import ModelConfig
from minimind_core.rope import rope_frequencies

T = gguf.MODEL_TENSOR

ARCHITECTURES = {
    "minimind2": "llama",
    "minimind2-moe": "granitemoe",
    "minimind3": "qwen3",
    "minimind3-moe": "qwen3moe",
}

# llama.cpp's rope for these is LLAMA_ROPE_TYPE_NORM (rotates interleaved pairs); MiniMind rotates
# halves, so their q/k rows are permuted per head, as convert_hf_to_gguf.py does for HF Llama.
INTERLEAVED_ROPE = frozenset({"llama", "granitemoe"})

# llama.cpp fixes YaRN's beta_fast/beta_slow at these for the four architectures (it reads the
# GGUF keys only for a few others), and multiplies cos/sin by 1 + 0.1 ln(factor) by itself.
LLAMA_CPP_YARN_BETAS = (32.0, 1.0)

# Our checkpoint suffix (after ``model.layers.{i}.``) → the GGUF tensor.
LAYER_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "input_layernorm.weight": T.ATTN_NORM,
    "self_attn.q_proj.weight": T.ATTN_Q,
    "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V,
    "self_attn.o_proj.weight": T.ATTN_OUT,
    "self_attn.q_norm.weight": T.ATTN_Q_NORM,
    "self_attn.k_norm.weight": T.ATTN_K_NORM,
    "post_attention_layernorm.weight": T.FFN_NORM,
    "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP,
    "mlp.down_proj.weight": T.FFN_DOWN,
    "mlp.gate.weight": T.FFN_GATE_INP,
}
EXPERT_TENSORS = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}
SHARED_TENSORS = {"gate_proj": T.FFN_GATE_SHEXP, "up_proj": T.FFN_UP_SHEXP,
                  "down_proj": T.FFN_DOWN_SHEXP}
# Kept in float32 whatever the outtype: quantizing the router flips experts (cosine 0.63 measured
# on minimind3-moe at q8_0), and it is tiny. 1-D tensors (norms) always stay float32 too.
F32_TENSORS = frozenset({T.FFN_GATE_INP})


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture for ``config``; ValueError when llama.cpp has no exact match."""
    arch = ARCHITECTURES[config.kind]
    if config.use_moe and not config.renormalize_topk:
        # granitemoe and qwen3moe always renormalise the top-k weights (build_moe_ffn norm_w=true)
        raise ValueError(
            f"this {config.kind} model does not renormalise its top-{config.num_experts_per_tok} "
            f"router weights (num_experts_per_tok=1 on MiniMind2, or norm_topk_prob=False), and "
            f"llama.cpp's {arch} always does; no GGUF architecture matches it exactly. Export "
            f"with num_experts_per_tok >= 2 (CLI: --num-experts-per-tok 2) or use another format")
    if not config.tie_word_embeddings:
        raise ValueError("an untied output head is not a MiniMind model; nothing to export")
    return arch


def tensor_name(tensor: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    """gguf-py's name of a tensor (``blk.3.attn_q.weight``)."""
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from rotate-half order to llama.cpp's interleaved pairs.

    Per head of ``d`` rows, row ``j`` of the first half goes to ``2j`` and row ``j`` of the second
    half to ``2j + 1`` (convert_hf_to_gguf.py's ``LlamaModel.permute``).
    """
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(config: ModelConfig, weights: Mapping[str, np.ndarray]
                 ) -> Iterator[tuple[str, gguf.MODEL_TENSOR, np.ndarray]]:
    """(GGUF name, tensor kind, float32 array) for every tensor of the exported model.

    The head is tied, so there is no ``output.weight``: llama.cpp reuses ``token_embd``.
    """
    arch = architecture(config)
    permute = arch in INTERLEAVED_ROPE

    def f32(key: str) -> np.ndarray:
        return np.ascontiguousarray(weights[key], dtype=np.float32)

    yield tensor_name(T.TOKEN_EMBD), T.TOKEN_EMBD, f32("model.embed_tokens.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for suffix, kind in LAYER_TENSORS.items():
            if p + suffix not in weights:
                continue
            arr = f32(p + suffix)
            if permute and kind is T.ATTN_Q:
                arr = permute_rope(arr, config.num_attention_heads)
            elif permute and kind is T.ATTN_K:
                arr = permute_rope(arr, config.num_key_value_heads)
            yield tensor_name(kind, i), kind, arr
        if config.use_moe:
            for proj, kind in EXPERT_TENSORS.items():
                # stacked [n_expert, out, in]: ggml's {in, out, n_expert}
                stacked = np.stack([f32(f"{p}mlp.experts.{e}.{proj}.weight")
                                    for e in range(config.num_experts)])
                yield tensor_name(kind, i), kind, stacked
        if config.n_shared_experts:
            # several shared experts are one wider FFN: gate/up rows and down columns concatenated
            for proj, kind in SHARED_TENSORS.items():
                parts = [f32(f"{p}mlp.shared_experts.{s}.{proj}.weight")
                         for s in range(config.n_shared_experts)]
                yield tensor_name(kind, i), kind, np.concatenate(
                    parts, axis=1 if proj == "down_proj" else 0)
    yield tensor_name(T.OUTPUT_NORM), T.OUTPUT_NORM, f32("model.norm.weight")


def write_hparams(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The architecture's hyper-parameter keys, from our ModelConfig."""
    arch = architecture(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if config.use_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if arch == "granitemoe":
        # Granite's multipliers neutral: logit_scale is required (logits / 1.0); embedding,
        # residual and attention scales unset mean none (attention: 1/sqrt(head_dim)).
        writer.add_logit_scale(1.0)
        if config.n_shared_experts:
            writer.add_expert_shared_feed_forward_length(
                config.n_shared_experts * config.intermediate_size)
    write_yarn(writer, config)


def write_yarn(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """Upstream's YaRN (``inference_rope_scaling``) as llama.cpp's rope-scaling keys, or refuse.

    llama.cpp's YaRN is upstream's ramp (``f_i (1 - r_i + r_i / factor)``) with its own
    ``1 + 0.1 ln(factor)`` on cos/sin; ``rope.scaling.attn_factor`` = attention_factor / that
    cancels it, so the scale applied is upstream's ``attention_factor``.
    """
    yarn = config.yarn
    if yarn is None:
        return
    factor, orig = float(yarn["factor"]), int(yarn["original_max_position_embeddings"])
    betas = (float(yarn["beta_fast"]), float(yarn["beta_slow"]))
    if betas != LLAMA_CPP_YARN_BETAS:
        raise ValueError(f"YaRN beta_fast/beta_slow {betas} differ from the {LLAMA_CPP_YARN_BETAS} "
                         f"llama.cpp uses for {architecture(config)}; export without "
                         f"inference_rope_scaling or with upstream's betas")
    if config.max_position_embeddings / orig <= 1.0 or factor <= 1.0:
        raise ValueError(f"YaRN with max_position_embeddings={config.max_position_embeddings}, "
                         f"original_max_position_embeddings={orig}, factor={factor} changes no "
                         f"frequency upstream, but llama.cpp would still scale; export without "
                         f"inference_rope_scaling")
    ours, _ = rope_frequencies(config)
    if not np.allclose(ours, llama_cpp_yarn_frequencies(config), rtol=1e-5, atol=0):
        raise ValueError("upstream's YaRN ramp for this head_dim / rope_theta is clamped where "
                         "llama.cpp's is not; export without inference_rope_scaling")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(factor)
    writer.add_rope_scaling_orig_ctx_len(orig)
    writer.add_rope_scaling_yarn_beta_fast(betas[0])
    writer.add_rope_scaling_yarn_beta_slow(betas[1])
    writer.add_rope_scaling_attn_factors(
        float(yarn["attention_factor"]) / (1.0 + 0.1 * math.log(factor)))


def llama_cpp_yarn_frequencies(config: ModelConfig) -> np.ndarray:
    """The per-pair frequencies llama.cpp's ggml rope computes under YaRN (ext_factor 1).

    ggml_rope_yarn_corr_dims: ``low = max(0, floor(c(beta_fast)))``, ``high = min(d - 1,
    ceil(c(beta_slow)))`` with ``c(b) = d ln(L0 / (2 pi b)) / (2 ln theta)``; pair ``i`` mixes
    ``f_i / factor`` and ``f_i`` by ``r_i = clamp((i - low) / max(0.001, high - low), 0, 1)``.
    """
    yarn: dict[str, Any] = config.yarn or {}
    d, theta = config.head_dim, float(config.rope_theta)
    orig, factor = yarn["original_max_position_embeddings"], float(yarn["factor"])

    def corr_dim(beta: float) -> float:
        return d * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low = max(0.0, math.floor(corr_dim(LLAMA_CPP_YARN_BETAS[0])))
    high = min(d - 1.0, math.ceil(corr_dim(LLAMA_CPP_YARN_BETAS[1])))
    i = np.arange(d // 2, dtype=np.float64)
    ramp = np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
    base = theta ** (-2.0 * i / d)
    return base * (1.0 - ramp) + base / factor * ramp
