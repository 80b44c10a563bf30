"""The MiniMind network in PyTorch: MiniMind2 and MiniMind-3, dense and both MoE kinds.

Module and parameter names are the checkpoint's (``model.layers.0.self_attn.q_proj.weight`` …),
so a state dict loads as it is. ``fuse()`` packs q/k/v and gate/up into single matrices for speed
and turns the original parameters into views of them, so names and storage stay shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimind_core.config import ModelConfig
from minimind_core.rope import rope_cos_sin

from .cache import KVCache


@dataclass
class Spans:
    """Where a prefill writes: row ``i``'s ``lengths[i]`` tokens, packed one row after another
    along T, go to positions ``starts[i]..`` of slot ``slots[i]``. Packing every row due in a
    step into one pass runs the linear layers once over all their tokens; attention stays per
    row. ``masks[i]``: the causal mask of a row that continues a cached prefix (else None)."""

    slots: list[int]
    starts: list[int]
    lengths: list[int]
    masks: list[torch.Tensor | None]


@dataclass
class Rows:
    """Where a decode step writes: one position per row, ``positions[i]`` of ``slots[i]``;
    ``view`` selects the rows' keys (a slice when the slots are contiguous: no copy) up to ``end``."""

    slots: torch.Tensor
    positions: torch.Tensor
    view: torch.Tensor | slice
    end: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_in_fp32: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.weight_in_fp32 = eps, weight_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.weight_in_fp32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool) -> torch.Tensor:
    """RMSNorm over the last dim; ``weight`` broadcasts against x (e.g. [heads, head_dim])."""
    if x.dtype == torch.float32:  # both generations agree in fp32: one fused op
        return F.rms_norm(x, x.shape[-1:], eps=eps) * weight
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:  # MiniMind-3: (w * x.float() * rsqrt).type_as(x)
        return (weight * normed).type_as(x)
    return weight * normed.type_as(x)  # MiniMind2: w * (...).type_as(x)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` written as ``x cos + swap_halves(x) sin_signed`` with
    ``sin_signed = cat(-sin, sin)``: the same numbers in three ops instead of six."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, self.heads * self.head_dim)
        self.k_proj = _linear(cfg.hidden_size, self.kv_heads * self.head_dim)
        self.v_proj = _linear(cfg.hidden_size, self.kv_heads * self.head_dim)
        self.o_proj = _linear(self.heads * self.head_dim, cfg.hidden_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
        self.qk_norm = cfg.qk_norm
        self.wqkv: torch.Tensor | None = None
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B), unmerged

    def _qk_norm_weight(self) -> torch.Tensor:
        """q_norm's weight for each q head, then k_norm's for each kv head: [heads + kv, d]."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        return torch.cat([self.q_norm.weight.expand(h, d), self.k_norm.weight.expand(kv, d)])

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = F.linear(x, getattr(self, name).weight)
        return self._add_lora(x, y, name)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora:  # y = W x + B (A x): upstream's LoRA, no scaling
            a, b = self.lora[name]
            y = y + F.linear(F.linear(x, a), b)
        return y

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row: grouped matmuls beat CPU SDPA's flash kernel by ~10x here."""
        b, rep = q.shape[0], self.heads // self.kv_heads
        qg = q.reshape(b, self.kv_heads, rep, self.head_dim)  # q head h uses kv head h // rep
        scores = (qg @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # [B, kv, rep, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        return (probs @ v).reshape(b, self.heads, 1, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, where: Spans | Rows | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        if self.wqkv is not None:
            qkv = F.linear(x, self.wqkv)
            if "q_proj" in self.lora:
                qkv[..., : h * d] += self._add_lora(x, 0, "q_proj")
        else:
            qkv = torch.cat([self._project(x, n) for n in ("q_proj", "k_proj", "v_proj")], dim=-1)
        qk = qkv[..., : (h + kv) * d].unflatten(-1, (h + kv, d))  # q and k heads side by side
        if self.qk_norm:  # per-head RMSNorm before RoPE (MiniMind-3)
            weight = self.qk_norm_weight if self.wqkv is not None else self._qk_norm_weight()
            qk = rms_norm(qk, weight, self.q_norm.eps, self.q_norm.weight_in_fp32)
        qk = apply_rope(qk, cos, sin).transpose(1, 2)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[..., (h + kv) * d:].unflatten(-1, (kv, d)).transpose(1, 2)
        if isinstance(where, Rows):  # decode: one query per row against its own slot
            cache.write(self.layer, where.slots, where.positions, k, v)
            k, v = cache.rows(self.layer, where.view, where.end)
            out = self._attend_one(q, k, v, mask)
        elif isinstance(where, Spans):  # prefill: each packed row against its own slot
            parts, offset = [], 0
            for slot, start, n, row_mask in zip(where.slots, where.starts, where.lengths,
                                                where.masks):
                end = offset + n
                ks, vs = cache.write_span(self.layer, slot, start, k[:, :, offset:end],
                                          v[:, :, offset:end])
                parts.append(_sdpa(q[:, :, offset:end], ks, vs, row_mask))
                offset = end
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        else:  # no cache: every row from position 0
            out = _sdpa(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self._project(out, "o_proj")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
          ) -> torch.Tensor:
    """Causal attention of T queries: from position 0 without a mask (the flash kernel), else
    with ``mask`` (queries that continue cached keys)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = _linear(hidden, ffn), _linear(hidden, ffn)
        self.down_proj = _linear(ffn, hidden)
        self.w13: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
        else:
            gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class MoE(nn.Module):
    """Routed experts (+ MiniMind2's shared experts). ``p = softmax(x Wg^T)``, top-k, renormalise."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renorm = cfg.num_experts_per_tok, cfg.renormalize_topk
        self.gate = _linear(cfg.hidden_size, cfg.num_experts)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.intermediate_size)
                                     for _ in range(cfg.num_experts))
        self.shared_experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.intermediate_size)
                                            for _ in range(cfg.n_shared_experts))
        self.dense_routing = False  # all experts, masked: static shapes for CUDA graphs

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.gate.weight).float().softmax(dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.route(flat)
        out = torch.zeros_like(flat)
        if self.dense_routing:
            dense = torch.zeros(flat.shape[0], len(self.experts), dtype=flat.dtype, device=flat.device)
            dense.scatter_(1, idx, weights)
            for e, expert in enumerate(self.experts):
                out = out + expert(flat) * dense[:, e:e + 1]
        else:
            for e, expert in enumerate(self.experts):
                rows, slot = torch.where(idx == e)
                if rows.numel():
                    out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        for shared in self.shared_experts:
            out = out + shared(flat)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.use_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                cfg.norm_weight_in_fp32)

    def forward(self, x, cos, sin, cache, where, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, where, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # an explicit weight skips reset_parameters: normal_ on the meta device imports
        # torch._dynamo (~3 s of load time); nn.Embedding's own init is N(0, 1)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if self.embed_tokens.weight.device.type != "meta":
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_in_fp32)


class MiniMindForCausalLM(nn.Module):
    """``model.*`` and a head tied to the token embedding, as in every MiniMind checkpoint."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_cos = self.rope_sin = torch.zeros(0)

    def build_rope(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """cos and signed-sin tables for the whole context window, built once (a captured graph
        and the C step hold their addresses, so they are never reallocated afterwards)."""
        n = self.config.max_position_embeddings
        cos, sin = rope_cos_sin(self.config, n)
        sin[:, : sin.shape[1] // 2] *= -1  # cat(-sin, sin): see apply_rope
        self.rope_cos = torch.from_numpy(cos).to(device=device, dtype=dtype)
        self.rope_sin = torch.from_numpy(sin).to(device=device, dtype=dtype)

    def _tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.rope_cos
        if not cos.numel() or cos.device != x.device or cos.dtype != x.dtype:
            self.build_rope(x.device, x.dtype)  # once per device/dtype, at the first call
        return self.rope_cos, self.rope_sin

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.norm(x), self.lm_head.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``input_ids`` [B, T] at positions 0..T-1 (no cache)."""
        t = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos_t, sin_t = self._tables(x)
        if t > cos_t.shape[0]:
            raise ValueError(f"{t} positions are past the context window of {cos_t.shape[0]}")
        cos, sin = cos_t[:t][:, None, :], sin_t[:t][:, None, :]
        for layer in self.model.layers:
            x = layer(x, cos, sin, None, None, None)
        return self._head(x)

    def prefill(self, input_ids: torch.Tensor, cache: KVCache, slots: list[int],
                starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Prompts of several rows in one pass: ``input_ids`` [1, N] holds each row's tokens one
        row after another, row ``i`` placed at positions ``starts[i]..`` of ``slots[i]`` (a
        chunk continues a row's cached keys when ``starts[i] > 0``). Returns the logits after
        each row's last token [rows, vocab]."""
        if sum(lengths) != input_ids.shape[1] or not len(slots) == len(starts) == len(lengths):
            raise ValueError(f"prefill: {input_ids.shape[1]} tokens for rows of {lengths} tokens")
        x = self.model.embed_tokens(input_ids)
        cos_t, sin_t = self._tables(x)
        if max(s + n for s, n in zip(starts, lengths)) > cos_t.shape[0]:
            raise ValueError(f"positions are past the context window of {cos_t.shape[0]}")
        if len(slots) == 1:  # one row: a slice of the tables, no gather
            pos: torch.Tensor | slice = slice(starts[0], starts[0] + lengths[0])
        else:
            pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(x.device)
        cos, sin = cos_t[pos][:, None, :], sin_t[pos][:, None, :]
        masks = [_causal(n, s, x.device) if n > 1 and s > 0 else None
                 for s, n in zip(starts, lengths)]
        where = Spans(slots, starts, lengths, masks)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, where, None)
        last = torch.tensor(lengths, device=x.device).cumsum(0) - 1
        return self._head(x[0, last])

    def decode(self, input_ids: torch.Tensor, cache: KVCache, where: Rows) -> torch.Tensor:
        """One token per row (``input_ids`` [B, 1]) at each row's own position → logits [B, V].
        With ``where.end`` fixed (the whole cache) every shape is static: the step compiles and
        can be captured as a CUDA graph."""
        x = self.model.embed_tokens(input_ids)
        cos_t, sin_t = self._tables(x)
        rope_pos = where.positions.clamp(max=cos_t.shape[0] - 1)  # scratch rows: any valid row
        cos, sin = cos_t[rope_pos][:, None, None, :], sin_t[rope_pos][:, None, None, :]
        keys = torch.arange(where.end, device=x.device)
        mask = (keys[None, :] <= where.positions[:, None])[:, None, None, :]
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, where, mask)
        return self._head(x)[:, -1]

    def set_dense_routing(self, dense: bool) -> None:
        """MoE layers compute every expert, masked: no data-dependent shapes or host syncs."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.dense_routing = dense

    @torch.no_grad()
    def fuse(self) -> None:
        """Pack q/k/v and gate/up into one matrix each; the named parameters become views."""
        for layer in self.model.layers:
            attn = layer.self_attn
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.wqkv = _pack(projections)
            if attn.qk_norm:  # built once for inference (training recomputes it for gradients)
                attn.qk_norm_weight = attn._qk_norm_weight()
            mlps = list(layer.mlp.experts) + list(layer.mlp.shared_experts) if isinstance(
                layer.mlp, MoE) else [layer.mlp]
            for mlp in mlps:
                mlp.w13 = _pack([mlp.gate_proj, mlp.up_proj])


def _causal(t: int, start: int, device) -> torch.Tensor:
    return torch.ones(t, start + t, dtype=torch.bool, device=device).tril_(start)


def _pack(linears: list[nn.Linear]) -> torch.Tensor:
    fused = torch.cat([lin.weight.data for lin in linears], dim=0)
    offset = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[offset:offset + n], requires_grad=False)
        offset += n
    return fused
