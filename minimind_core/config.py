"""ModelConfig and the format facts of both MiniMind generations (see FORMATS.md).

Every fact that decides how a checkpoint is read lives here once: FFN width rules, per-generation
defaults (rms eps, router top-k), the YaRN parameters, and how a config is inferred from tensor
shapes and from/to a transformers ``config.json``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

MINIMIND2 = "minimind2"
MINIMIND3 = "minimind3"
GENERATIONS = (MINIMIND2, MINIMIND3)

# Upstream's `inference_rope_scaling=True` (current form, both generations).
YARN_DEFAULTS: dict[str, Any] = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32,
    "beta_slow": 1,
    "attention_factor": 1.0,
}

# The largest context window accepted (positions). Released models have 32768 (YaRN: 16 x 2048);
# the KV cache and RoPE tables grow with it, so a config.json saying 1e12 is refused, not allocated.
MAX_CONTEXT = 1 << 20

# What the weights cannot tell, per generation (FORMATS.md).
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    MINIMIND2: {"rms_norm_eps": 1e-5, "num_experts_per_tok": 2, "num_attention_heads": 8},
    MINIMIND3: {"rms_norm_eps": 1e-6, "num_experts_per_tok": 1, "num_attention_heads": 8},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def ffn_width(generation: str, hidden_size: int) -> int:
    """The dense FFN width upstream derives from the hidden size."""
    if generation == MINIMIND2:
        return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)
    if generation == MINIMIND3:
        return math.ceil(hidden_size * math.pi / 64) * 64
    raise ValueError(f"unknown generation {generation!r}; choose from {GENERATIONS}")


@dataclass
class ModelConfig:
    """Every hyper-parameter of a MiniMind model, plus which generation it is."""

    generation: str = MINIMIND2
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1408
    vocab_size: int = 6400
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    norm_topk_prob: bool = True
    # RoPE extrapolation (YaRN), an inference-time switch
    inference_rope_scaling: bool = False
    rope_scaling: dict[str, Any] | None = None
    # special ids (both generations)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {GENERATIONS}, got {self.generation!r}")
        self._validate()
        if self.inference_rope_scaling and self.rope_scaling is None:
            self.rope_scaling = dict(YARN_DEFAULTS)

    def _validate(self) -> None:
        """Reject settings no MiniMind model can have, with the field named (overrides land here)."""
        for f in fields(self):
            if f.name not in ("generation", "extra", "rope_scaling"):
                check_field(f.name, getattr(self, f.name))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary "
                                 f"(vocab_size={self.vocab_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        k = self.num_experts_per_tok
        if self.num_experts and (not _is_int(k) or not 1 <= k <= self.num_experts):
            raise ValueError(f"num_experts_per_tok must be an integer from 1 to num_experts="
                             f"{self.num_experts}, got {k!r}")
        scaling = self.rope_scaling
        if scaling is not None and (not isinstance(scaling, Mapping) or
                                    scaling.get("type", scaling.get("rope_type")) != "yarn"):
            raise ValueError(f"rope_scaling must be upstream's YaRN block ({{'type': 'yarn', "
                             f"'factor': 16, ...}}), got {scaling!r}")
        if scaling is not None:
            check_yarn({**YARN_DEFAULTS, **scaling})

    # --- derived facts -------------------------------------------------------------------
    @property
    def use_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def qk_norm(self) -> bool:
        """MiniMind-3 RMS-normalises each head of q and k before RoPE."""
        return self.generation == MINIMIND3

    @property
    def kind(self) -> str:
        """A short name for the architecture: minimind2, minimind2-moe, minimind3, minimind3-moe."""
        return self.generation + ("-moe" if self.use_moe else "")

    @property
    def renormalize_topk(self) -> bool:
        """MiniMind2 renormalises the router's top-k weights only when k > 1; MiniMind-3 always."""
        if not self.norm_topk_prob:
            return False
        return self.generation == MINIMIND3 or self.num_experts_per_tok > 1

    @property
    def norm_weight_in_fp32(self) -> bool:
        """MiniMind-3 multiplies the RMSNorm weight before casting back; MiniMind2 after."""
        return self.generation == MINIMIND3

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters in force, or None when RoPE is used as trained."""
        if not self.inference_rope_scaling:
            return None
        return {**YARN_DEFAULTS, **(self.rope_scaling or {})}

    def num_parameters(self) -> int:
        """Parameter count with the tied head counted once."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size
        if self.use_moe:
            mlp = mlp * (self.num_experts + self.n_shared_experts) + self.num_experts * h
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def for_generation(cls, generation: str, hidden_size: int = 512, num_hidden_layers: int = 8,
                       *, use_moe: bool = False, **overrides: Any) -> ModelConfig:
        """A config built the way upstream builds one from (hidden, layers, use_moe)."""
        defaults = dict(GENERATION_DEFAULTS[generation])
        heads = overrides.pop("num_attention_heads", defaults.pop("num_attention_heads"))
        base: dict[str, Any] = {
            "generation": generation,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2 if generation == MINIMIND2 else 4,
            "head_dim": hidden_size // heads,
            "intermediate_size": ffn_width(generation, hidden_size),
            **defaults,
        }
        if use_moe:
            base["num_experts"] = 4
            base["n_shared_experts"] = 1 if generation == MINIMIND2 else 0
        base.update(overrides)
        return cls(**base)

    def updated(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields replaced (unknown names raise ValueError)."""
        return replace(self, **_known_fields(overrides, strict=True))


_FIELD_NAMES = {f.name for f in fields(ModelConfig)}

# --- value checks (one rule per field, for overrides, config.json and direct construction) -----

_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings")
# (num_experts_per_tok: its range, 1..num_experts, is checked with the experts.)
_COUNTS = ("num_experts", "n_shared_experts", "num_experts_per_tok", "bos_token_id",
           "eos_token_id", "pad_token_id")
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "inference_rope_scaling")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_field(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` when ``value`` is of the wrong type or out of range."""
    if name in _POSITIVE_INTS and (not _is_int(value) or value <= 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if name in _COUNTS and (not _is_int(value) or value < 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if name in _BOOLS and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if name == "rms_norm_eps" and (not _is_real(value) or value <= 0):
        raise ValueError(f"rms_norm_eps must be a positive number (and finite), got {value!r}")
    if name == "rope_theta" and (not _is_real(value) or value <= 1):
        raise ValueError(f"rope_theta must be a positive number above 1 (a RoPE base; every "
                         f"release uses 1e6), got {value!r}")
    if name == "max_position_embeddings" and value > MAX_CONTEXT:
        raise ValueError(f"max_position_embeddings={value} is above the {MAX_CONTEXT} positions "
                         f"minimind-core supports (the KV cache and RoPE tables grow with it; "
                         f"MiniMind releases have 32768); fix config.json or pass "
                         f"max_position_embeddings=N (CLI: --max-position-embeddings N)")


def check_yarn(yarn: Mapping[str, Any]) -> None:
    """YaRN parameters that the formula (rope.py) can use: each finite and positive."""
    for key in ("factor", "beta_fast", "beta_slow", "attention_factor"):
        if not _is_real(yarn.get(key)) or yarn[key] <= 0:
            raise ValueError(f"rope_scaling {key} must be a positive number, got {yarn.get(key)!r}")
    orig = yarn.get("original_max_position_embeddings")
    if not _is_int(orig) or not 0 < orig <= MAX_CONTEXT:
        raise ValueError(f"rope_scaling original_max_position_embeddings must be an integer from 1 "
                         f"to {MAX_CONTEXT}, got {orig!r}")

# Names used by upstream's MiniMindConfig, transformers configs and eval_llm.py flags.
FIELD_ALIASES = {
    "n_routed_experts": "num_experts",
    "num_local_experts": "num_experts",
    "n_shared_experts": "n_shared_experts",
    "shared_expert_count": "n_shared_experts",
    "top_k": "num_experts_per_tok",
    "moe_top_k": "num_experts_per_tok",
    "n_layers": "num_hidden_layers",
    "dim": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "moe_intermediate_size": "intermediate_size",
}


def _known_fields(values: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = FIELD_ALIASES.get(key, key)
        if key in _FIELD_NAMES and key != "extra":
            out[key] = value
        elif strict:
            raise ValueError(
                f"unknown model setting {key!r}; known settings: {sorted(_FIELD_NAMES - {'extra'})}")
    return out


def config_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """Known ModelConfig fields from a transformers / upstream ``config.json`` (partial).

    Only what tensor shapes cannot tell matters here (heads, top-k, eps, theta, YaRN); shapes win
    over anything else a config file says.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config.json must hold a JSON object, not a {type(data).__name__}")
    out = {k: v for k, v in _known_fields(data, strict=False).items() if v is not None}
    model_type = data.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):
        out["generation"] = MINIMIND3
    elif model_type == "llama":
        out["generation"] = MINIMIND2
    elif out.get("generation") not in GENERATIONS:
        out.pop("generation", None)
    use_moe = data.get("use_moe")
    if use_moe is not None and not isinstance(use_moe, bool):
        raise ValueError(f"use_moe must be true or false, got {use_moe!r}")
    if use_moe is False:  # upstream keeps its MoE defaults (4 experts, 1 shared) in dense configs
        out["num_experts"] = out["n_shared_experts"] = 0
    # MoE: the experts' width; dense: intermediate_size (upstream writes both, equal by default)
    moe = use_moe is True or model_type == "qwen3_moe"
    width = data.get("moe_intermediate_size") if moe else data.get("intermediate_size")
    if width is not None:
        out["intermediate_size"] = width
    scaling = data.get("rope_scaling")
    params = data.get("rope_parameters")
    if isinstance(params, Mapping):  # transformers 5 writes theta and YaRN here instead
        if out.get("rope_theta") is None and params.get("rope_theta") is not None:
            out["rope_theta"] = params["rope_theta"]
        if not isinstance(scaling, Mapping):
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    for key, value in out.items():
        check_field(key, value)
    if isinstance(scaling, Mapping) and scaling.get("type", scaling.get("rope_type")) == "yarn":
        # upstream writes rope_scaling only when inference_rope_scaling is on
        given = {k: v for k, v in scaling.items() if v is not None}  # transformers: null = default
        out["rope_scaling"] = {**YARN_DEFAULTS, **given}
        check_yarn(out["rope_scaling"])
        out.setdefault("inference_rope_scaling", True)
    else:
        out.pop("rope_scaling", None)
    return out


def infer_config(shapes: Mapping[str, tuple[int, ...]], hints: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Infer a ModelConfig from tensor shapes (checkpoint key → shape).

    ``hints`` come from a config file beside the weights and fill what the shapes cannot tell
    (heads when ambiguous, top-k, eps, rope theta, YaRN); ``overrides`` are the user's and win,
    but one that contradicts a tensor shape raises ValueError naming the tensor.
    """
    hints = dict(hints or {})
    overrides = _known_fields(overrides or {}, strict=True)
    emb_key = "model.embed_tokens.weight" if "model.embed_tokens.weight" in shapes else "lm_head.weight"
    if emb_key not in shapes:
        raise ValueError("no 'model.embed_tokens.weight' or 'lm_head.weight' in the checkpoint: "
                         "it is not a MiniMind model state dict")
    vocab, hidden = _shape(shapes, emb_key, 2)
    layer_ids = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
    layers = len(layer_ids)
    if layers == 0:
        raise ValueError("no 'model.layers.N.*' keys in the checkpoint: it is not a MiniMind model")
    if layer_ids != set(range(layers)):
        missing = [i for i in range(layers + 5) if i not in layer_ids][:5]
        raise ValueError(f"checkpoint layers are not contiguous: layer(s) {missing} missing")

    p = "model.layers.0."
    generation = MINIMIND3 if p + "self_attn.q_norm.weight" in shapes else MINIMIND2
    defaults = GENERATION_DEFAULTS[generation]
    q_out = _shape(shapes, p + "self_attn.q_proj.weight", 2)[0]
    k_out = _shape(shapes, p + "self_attn.k_proj.weight", 2)[0]
    if generation == MINIMIND3:
        head_dim = _shape(shapes, p + "self_attn.q_norm.weight", 1)[0]
        if head_dim == 0 or q_out % head_dim:
            raise ValueError(f"q_proj width {q_out} is not a multiple of the q_norm width "
                             f"{head_dim} ({p}self_attn.q_norm.weight)")
        heads = q_out // head_dim
    else:
        heads = overrides.get("num_attention_heads", hints.get("num_attention_heads",
                                                                 defaults["num_attention_heads"]))
        check_field("num_attention_heads", heads)
        if q_out % heads:
            raise ValueError(f"num_attention_heads={heads} does not divide the q_proj width {q_out} "
                             f"({p}self_attn.q_proj.weight); pass num_attention_heads=<divisor>")
        head_dim = q_out // heads
    if k_out % head_dim or k_out == 0:
        raise ValueError(f"k_proj width {k_out} is not a multiple of head_dim {head_dim}")

    experts = sorted({int(m.group(1)) for k in shapes if (m := _EXPERT.match(k))})
    shared = sorted({int(m.group(1)) for k in shapes if (m := _SHARED.match(k))})
    if experts:
        ffn = _shape(shapes, p + "mlp.experts.0.gate_proj.weight", 2)[0]
        n_experts = _shape(shapes, p + "mlp.gate.weight", 2)[0]
    else:
        ffn = _shape(shapes, p + "mlp.gate_proj.weight", 2)[0]
        n_experts = 0

    from_shapes = {
        "generation": generation,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": k_out // head_dim,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "num_experts": n_experts,
        "n_shared_experts": len(shared),
        # A checkpoint may hold the tied head once or twice; an untied head would need different
        # values, which the loader checks. Every released model is tied.
        "tie_word_embeddings": True,
    }
    for key, value in overrides.items():
        if key in from_shapes and key != "tie_word_embeddings" and value != from_shapes[key]:
            if key == "num_attention_heads" and generation == MINIMIND2:
                continue  # heads are a free choice in MiniMind2 (checked above)
            raise ValueError(f"{key}={value!r} contradicts the checkpoint, whose tensors give "
                             f"{key}={from_shapes[key]!r}; drop the override or pick the matching file")
    # A config file that contradicts the weights belongs to another model: never drop it silently.
    for key, value in hints.items():
        if (key in from_shapes and key not in overrides and key != "tie_word_embeddings"
                and value != from_shapes[key]
                and not (key == "num_attention_heads" and generation == MINIMIND2)):
            raise ValueError(f"its config.json says {key}={value!r} but the weights give "
                             f"{key}={from_shapes[key]!r}; the config belongs to another model: fix "
                             f"or remove it")
    settings: dict[str, Any] = {k: v for k, v in defaults.items() if k != "num_attention_heads"}
    settings.update({k: v for k, v in hints.items() if k not in from_shapes})
    settings.update(from_shapes)
    settings.update({k: v for k, v in overrides.items() if k not in from_shapes})
    if overrides.get("rope_scaling") and "inference_rope_scaling" not in overrides:
        settings["inference_rope_scaling"] = True  # asking for a YaRN block means using it
    return ModelConfig(**settings)


_LAYER = re.compile(r"^model\.layers\.(\d{1,9})\.")
_EXPERT = re.compile(r"^model\.layers\.0\.mlp\.experts\.(\d{1,9})\.")
_SHARED = re.compile(r"^model\.layers\.0\.mlp\.shared_experts\.(\d{1,9})\.")


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"missing key {key!r} in the checkpoint")
    if len(shapes[key]) != ndim:
        raise ValueError(f"{key} has shape {list(shapes[key])}; a MiniMind model has a "
                         f"{ndim}-dimensional tensor there")
    return shapes[key]


# --- transformers config.json (export) ----------------------------------------------------

def hf_model_type(config: ModelConfig) -> str:
    """The stock architecture a MiniMind model is exactly (MiniMind2-MoE has none)."""
    return {"minimind2": "llama", "minimind3": "qwen3", "minimind3-moe": "qwen3_moe",
            "minimind2-moe": "minimind"}[config.kind]


def hf_common_fields(config: ModelConfig) -> dict[str, Any]:
    """The config.json fields every exported architecture shares (sizes, eps, theta, ids)."""
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A transformers-style config.json dict (Llama / Qwen3 / Qwen3-MoE / upstream minimind)."""
    model_type = hf_model_type(config)
    out: dict[str, Any] = {"model_type": model_type, **hf_common_fields(config)}
    if model_type == "llama":
        out["architectures"] = ["LlamaForCausalLM"]
    elif model_type == "qwen3":
        out["architectures"] = ["Qwen3ForCausalLM"]
    elif model_type == "qwen3_moe":
        out.update({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": config.num_experts,
                    "num_experts_per_tok": config.num_experts_per_tok,
                    "moe_intermediate_size": config.intermediate_size, "decoder_sparse_step": 1,
                    "mlp_only_layers": [], "norm_topk_prob": config.norm_topk_prob,
                    "output_router_logits": False})
    else:
        out.update({"architectures": ["MiniMindForCausalLM"], "use_moe": True,
                    "n_routed_experts": config.num_experts,
                    "num_experts_per_tok": config.num_experts_per_tok,
                    "n_shared_experts": config.n_shared_experts,
                    "norm_topk_prob": config.norm_topk_prob, "generation": config.generation})
    return out
