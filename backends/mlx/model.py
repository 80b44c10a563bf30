"""The MiniMind network in MLX: MiniMind2 and MiniMind-3, dense and both MoE kinds.

Same module tree and parameter names as ``backends/torch/model.py`` (the checkpoint's names), with
one exception that maps one-to-one: routed experts are stacked into mlx_lm's ``SwitchGLU``, so
``mlp.experts.{e}.gate_proj.weight`` is row ``e`` of ``mlp.switch_mlp.gate_proj.weight``
(``sanitize`` stacks them; ``checkpoint.py`` unstacks them on read). That is also the layout
stock mlx_lm's ``qwen3_moe`` uses, so a converted folder loads there as it is.

The model follows mlx_lm's protocol (``__call__(inputs, cache)``, ``.layers``, ``make_cache()``,
``sanitize()``, ``args``, ``model_type``), so mlx_lm's ``generate_step``, KV caches and
``nn.quantize`` work on it unchanged; the engine runs it over its own slot cache (``cache.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

from minimind_core.bailing import from_bailing_moe
from minimind_core.checkpoint import strip_prefixes
from minimind_core.config import ModelConfig, hf_model_type
from minimind_core.rope import rope_frequencies


class RMSNorm(nn.Module):
    """RMSNorm with each generation's rounding in half precision (identical in fp32).

    MiniMind2: ``w * (x.float() * rsqrt(...)).type_as(x)``, i.e. cast, then multiply by the weight
    (what ``mx.fast.rms_norm`` does in half precision). MiniMind-3:
    ``(w * x.float() * rsqrt(...)).type_as(x)``, one rounding at the end, so it runs in fp32.
    """

    def __init__(self, dims: int, eps: float, weight_in_fp32: bool) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps, self.weight_in_fp32 = eps, weight_in_fp32

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        if self.weight_in_fp32:
            return mx.fast.rms_norm(x.astype(mx.float32), self.weight, self.eps).astype(x.dtype)
        return mx.fast.rms_norm(x, None, self.eps) * self.weight


class RoPE(nn.Module):
    """Rotate-half RoPE with the frequencies of ``minimind_core.rope`` (YaRN included).

    ``mx.fast.rope`` takes ``freqs`` as periods (``theta^(2i/d)``, the inverse of the angular
    frequencies ``f_i``) and applies ``angle = position * f_i``. YaRN's attention factor multiplies
    cos and sin, i.e. the rotated vector.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.dims = config.head_dim
        self._periods = mx.array(1.0 / inv_freq.astype("float64"), dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        out = mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                           freqs=self._periods)
        if self.attention_factor != 1.0:
            out = out * self.attention_factor
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
        self.rope = rope

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:  # per-head RMSNorm before RoPE (MiniMind-3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _SwitchLinear(SwitchLinear):
    """mlx_lm's stacked-expert linear; MLX's CPU ``gather_mm`` takes only fp32, so half precision
    on the CPU computes in fp32 (the GPU and quantized experts need no such detour)."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if self.weight.dtype == mx.float32 or mx.default_device() != mx.cpu:
            return super().__call__(x, indices, sorted_indices)
        out = mx.gather_mm(x.astype(mx.float32), self.weight.swapaxes(-1, -2).astype(mx.float32),
                           rhs_indices=indices, sorted_indices=sorted_indices)
        return out.astype(x.dtype)


def _switch_glu(hidden: int, ffn: int, experts: int) -> SwitchGLU:
    glu = SwitchGLU(hidden, ffn, experts)
    glu.gate_proj = _SwitchLinear(hidden, ffn, experts, bias=False)
    glu.up_proj = _SwitchLinear(hidden, ffn, experts, bias=False)
    glu.down_proj = _SwitchLinear(ffn, hidden, experts, bias=False)
    return glu


class MoE(nn.Module):
    """Routed experts (stacked) + MiniMind2's shared experts. ``p = softmax(x Wg^T)``, top-k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renorm = cfg.num_experts_per_tok, cfg.renormalize_topk
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.switch_mlp = _switch_glu(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts)
        if cfg.n_shared_experts:
            self.shared_experts = [MLP(cfg.hidden_size, cfg.intermediate_size)
                                   for _ in range(cfg.n_shared_experts)]

    def __call__(self, x: mx.array) -> mx.array:
        # Routing in fp32, as upstream (and the torch backend) does.
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, idx, axis=-1)
        if self.renorm:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        y = self.switch_mlp(x, idx)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        for shared in getattr(self, "shared_experts", []):
            y = y + shared(x)
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, rope)
        self.mlp = MoE(cfg) if cfg.use_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                cfg.norm_weight_in_fp32)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        rope = RoPE(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg, rope) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)

    def __call__(self, inputs: mx.array, cache: list | None = None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        # our slot cache's views give each row's mask; mlx_lm's caches (stock loops) their own
        mask = cache[0].mask() if hasattr(cache[0], "mask") else create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """``model.*`` and a head tied to the token embedding, as in every MiniMind checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.args = config
        self.model_type = hf_model_type(config)
        self.model = Backbone(config)

    def __call__(self, inputs: mx.array, cache: list | None = None,
                 input_embeddings: mx.array | None = None) -> mx.array:
        """Logits [B, T, vocab] for ``inputs`` [B, T], appended to ``cache`` when given."""
        h = self.model(inputs, cache, input_embeddings)
        return self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names → this model's: drop the tied head and buffers, stack routed experts
        (a stock ``bailing_moe`` folder's names are mapped back first)."""
        out: dict[str, mx.array] = {}
        experts: dict[tuple[str, str], dict[int, mx.array]] = {}
        if "model.word_embeddings.weight" in weights:
            cfg = self.args
            weights = from_bailing_moe(weights, heads=cfg.num_attention_heads,
                                       kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                       n_shared=cfg.n_shared_experts)
        for key, value in weights.items():
            key = strip_prefixes(key)
            if key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq"):
                continue
            parts = key.split(".")
            # model.layers.{i}.mlp.experts.{e}.{proj}.weight
            if len(parts) == 8 and parts[3:5] == ["mlp", "experts"] and parts[5].isdigit():
                base = ".".join(parts[:4])
                experts.setdefault((base, parts[6]), {})[int(parts[5])] = value
                continue
            out[key] = value
        for (base, proj), rows in experts.items():
            if sorted(rows) != list(range(len(rows))):
                raise ValueError(f"{base}.experts: expert indices {sorted(rows)} are not 0..{len(rows) - 1}")
            out[f"{base}.switch_mlp.{proj}.weight"] = mx.stack([rows[e] for e in range(len(rows))])
        return out


def config_from_mlx(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """A ModelConfig from an MLX folder's config.json (converter-written or mlx_lm-style).

    Quantized weights do not show their shapes, so the config file is the source here. The
    ``minimind.config`` block that ``converters.to_mlx`` writes fills what the stock fields cannot
    say (generation, YaRN); the stock fields win, so an edit a user makes there takes effect.
    """
    from minimind_core.config import config_from_json

    block = data.get("minimind") or {}
    fields = dict(block["config"]) if isinstance(block.get("config"), Mapping) else {}
    stock = config_from_json(data)
    if data.get("model_type") == "qwen3_moe" and "moe_intermediate_size" in data:
        stock["intermediate_size"] = data["moe_intermediate_size"]
    fields.update(stock)
    if "head_dim" not in fields and "hidden_size" in fields:
        fields["head_dim"] = fields["hidden_size"] // fields.get("num_attention_heads", 8)
    missing = [k for k in ("generation", "hidden_size", "num_hidden_layers", "vocab_size")
               if k not in fields]
    if missing:
        raise ValueError(f"config.json lacks {missing}; it does not describe a MiniMind model")
    return ModelConfig(**fields).updated(**dict(overrides or {}))


class _Args:
    """What mlx_lm's ``load_model`` calls ``ModelArgs``: builds the ModelConfig from config.json."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self.overrides = dict(overrides or {})

    def from_dict(self, params: Mapping[str, Any]) -> ModelConfig:
        return config_from_mlx(params, self.overrides)


def model_classes(overrides: Mapping[str, Any] | None = None):
    """``get_model_classes`` for ``mlx_lm.utils.load_model``: this Model for any MiniMind folder."""
    args = _Args(overrides)
    return lambda config: (Model, args)
