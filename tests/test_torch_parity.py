"""TorchEngine against independent references: transformers' Llama / Qwen3 / Qwen3-MoE on the same
weights, and a MiniMind2-MoE reference written here from FORMATS.md's routing formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import random_weights, tiny_config  # noqa: E402

from minimind_core import load  # noqa: E402
from minimind_core.config import ModelConfig  # noqa: E402
from minimind_core.rope import rope_frequencies  # noqa: E402

PROMPT = [1, 5, 77, 200, 31, 9, 402, 17, 88, 3, 250, 11]
N_TOKENS = 24


def hf_model(config: ModelConfig, weights: dict[str, np.ndarray]):
    """The stock transformers class that a MiniMind kind is exactly, loaded with our weights."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads,
                  num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
                  max_position_embeddings=config.max_position_embeddings,
                  tie_word_embeddings=True, attention_bias=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    if config.kind == "minimind2" or config.kind == "minimind2-moe":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=False, **common))
    elif config.kind == "minimind3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.intermediate_size, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], **common))
        state = fuse_experts_hf(state, config)
    if config.kind == "minimind2-moe":
        for i, layer in enumerate(model.model.layers):
            layer.mlp = ReferenceMoE(config, weights, i)
        state = {k: v for k, v in state.items() if ".mlp." not in k}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "mlp" not in m or
                                   config.kind != "minimind2-moe"], (missing, unexpected)
    return model.eval()


def fuse_experts_hf(state, config):
    """transformers 5 stores Qwen3-MoE experts as [E, 2I, H] gate_up and [E, H, I] down."""
    out = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat(
            [state[f"{p}.{e}.gate_proj.weight"], state[f"{p}.{e}.up_proj.weight"]])
            for e in range(config.num_experts)])
        out[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.down_proj.weight"]
                                             for e in range(config.num_experts)])
    return out


class ReferenceMoE(torch.nn.Module):
    """MiniMind2-MoE written token by token from FORMATS.md: p = softmax(x Wg^T), top-k,
    renormalise when k > 1, y = sum_k p_k expert_k(x) + sum_s shared_s(x)."""

    def __init__(self, config: ModelConfig, weights, layer: int) -> None:
        super().__init__()
        p = f"model.layers.{layer}.mlp."
        t = {k[len(p):]: torch.from_numpy(v.copy()) for k, v in weights.items() if k.startswith(p)}
        self.t, self.cfg = t, config

    def mlp(self, x, prefix):
        g, u, d = (self.t[f"{prefix}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        return d @ (torch.nn.functional.silu(g @ x) * (u @ x))

    def forward(self, h):
        out = torch.zeros_like(h)
        k = self.cfg.num_experts_per_tok
        for b in range(h.shape[0]):
            for s in range(h.shape[1]):
                x = h[b, s]
                probs = torch.softmax(self.t["gate.weight"] @ x, dim=-1)
                top = torch.topk(probs, k)
                w = top.values / top.values.sum() if k > 1 else top.values
                y = sum(w[j] * self.mlp(x, f"experts.{int(top.indices[j])}") for j in range(k))
                for sh in range(self.cfg.n_shared_experts):
                    y = y + self.mlp(x, f"shared_experts.{sh}")
                out[b, s] = y
        return out


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["minimind2", "minimind3", "minimind3-moe", "minimind2-moe"])
def test_logits_and_greedy_tokens_match_reference(kind, make_checkpoint):
    path, config, weights = make_checkpoint(kind)
    engine = load(path, backend="torch", device="cpu", dtype="float32")
    assert engine.config.kind == kind
    ref = hf_model(config, weights)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0].numpy()
    ours = engine.logits(PROMPT)
    assert np.abs(ours - ref_logits).max() <= 1e-4
    # greedy through the cached prefill/decode path, eos ignored by the reference
    ref_tokens = hf_greedy(ref, PROMPT, N_TOKENS)
    steps = engine.iter_tokens([PROMPT], engine_params(N_TOKENS))
    ours_tokens = [int(next(steps)[0]) for _ in range(N_TOKENS)]
    steps.close()
    assert ours_tokens == ref_tokens


def test_a_bare_model_builds_its_rope_tables(make_checkpoint):
    """The torch module used on its own (training, as examples/train_demo_model.py does) builds
    its RoPE tables at the first forward: the reference's logits, not "past the window of 0"."""
    from backends.torch.model import MiniMindForCausalLM

    _, config, weights = make_checkpoint("minimind3")
    model = MiniMindForCausalLM(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        ours = model(torch.tensor([PROMPT]))[0].numpy()
        want = hf_model(config, weights)(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(ours - want).max() <= 1e-4


def engine_params(n):
    from minimind_core.params import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0)


def yarn_reference(d: int, theta: float, L0=2048, factor=16, beta_fast=32, beta_slow=1):
    """FORMATS.md's formula, element by element in float64."""
    def b(r):
        return d * math.log(L0 / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(b(beta_fast)), 0)
    high = min(math.ceil(b(beta_slow)), d // 2 - 1)
    out = []
    for i in range(d // 2):
        f = theta ** (-2 * i / d)
        ramp = min(max((i - low) / max(high - low, 0.001), 0.0), 1.0)
        out.append(f * (1 - ramp + ramp / factor))
    return np.array(out)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 16])
def test_yarn_frequencies_follow_formats_formula(head_dim):
    cfg = ModelConfig(head_dim=head_dim, inference_rope_scaling=True)
    freqs, attn = rope_frequencies(cfg)
    np.testing.assert_allclose(freqs, yarn_reference(head_dim, 1e6), rtol=2e-6)
    assert attn == 1.0
    plain, _ = rope_frequencies(ModelConfig(head_dim=head_dim))
    np.testing.assert_allclose(plain, [1e6 ** (-2 * i / head_dim) for i in range(head_dim // 2)],
                               rtol=2e-6)
    assert not np.allclose(plain, freqs)  # low frequencies really are scaled


def test_yarn_model_matches_llama_with_yarn_frequencies(make_checkpoint):
    path, config, weights = make_checkpoint("minimind2")
    engine = load(path, backend="torch", device="cpu", dtype="float32", inference_rope_scaling=True)
    ref = hf_model(config, weights)
    freqs = torch.tensor(yarn_reference(config.head_dim, config.rope_theta), dtype=torch.float32)
    ref.model.rotary_emb.inv_freq.copy_(freqs)
    ids = list(range(3, 40))
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(engine.logits(ids) - ref_logits).max() <= 1e-4
    plain = load(path, backend="torch", device="cpu", dtype="float32")
    assert np.abs(plain.logits(ids) - ref_logits).max() > 1e-4


@pytest.mark.parametrize("kind", ["minimind2", "minimind3-moe"])
def test_batch_equals_one_by_one(kind, make_checkpoint):
    path, _, _ = make_checkpoint(kind)
    engine = load(path, backend="torch", device="cpu", dtype="float32")
    prompts = [[1, 5, 9], list(range(3, 40)), [1, 200, 300, 40, 50, 60, 70]]
    batch = engine.generate_batch(prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, batch):
        alone = engine.generate(prompt, max_new_tokens=12)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text


@pytest.mark.parametrize("dtype,tol", [("float16", 0.05), ("bfloat16", 0.15)])
def test_half_precision_on_cpu_close_to_fp32(dtype, tol, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")
    ref = load(path, backend="torch", device="cpu", dtype="float32").logits(PROMPT)
    engine = load(path, backend="torch", device="cpu", dtype=dtype)
    assert engine.info["dtype"] == dtype
    got = engine.logits(PROMPT)
    assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_tiny_config_matches_ffn_rule():
    from minimind_core.config import ffn_width

    # the released models' FFN widths (FORMATS.md table)
    assert ffn_width("minimind2", 512) == 1408
    assert ffn_width("minimind2", 768) == 2048
    assert ffn_width("minimind2", 640) == 1728
    assert ffn_width("minimind3", 768) == 2432
    assert tiny_config("minimind3").qk_norm and not tiny_config("minimind2").qk_norm
    assert random_weights(tiny_config())["model.norm.weight"].shape == (128,)
