"""One shared tiny-model factory used by every test: random MiniMind checkpoints in upstream's
format (``out/full_sft_<hidden>[_moe].pth`` with the tokenizer in a sibling ``model/`` folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from minimind_core.checkpoint import expected_shapes
from minimind_core.config import MINIMIND2, MINIMIND3, ModelConfig

# The ONE place under tests/ that reaches the shared folder beside the repo (upstream's real
# tokenizers, never copied into it); every test reaches it through the ``real_tokenizer``
# fixture, and test_self_contained.py holds every other test file to that (OUTSIDE_MARKERS).
SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZERS = SHARED / "minimind-tokenizers"
# What naming that folder looks like in a test file: its name as a path part or string, the
# names above, or climbing from __file__ past the repo root.
OUTSIDE_MARKERS = (
    r"minimind-tokenizers",
    r"""["']shared["']""",
    r"\bshared/",
    r"\bSHARED\b",
    r"\bTOKENIZERS\b",
    r"__file__.*\.parents\[[2-9]\]",
    r"__file__.*(\.parent){3}",
    r"\bROOT\.parent\b",
)


def shared_folder_mentions(text: str) -> list[str]:
    """The lines of ``text`` that name the shared folder (any of OUTSIDE_MARKERS)."""
    import re

    patterns = [re.compile(m) for m in OUTSIDE_MARKERS]
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in patterns)]


def pytest_configure(config) -> None:
    # Tiny test models gain nothing from intra-op threads, and on a busy machine OpenMP's
    # spinning barriers make each small op take milliseconds (measured: 250 vs 10 tok/s).
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@dataclass(frozen=True)
class RealTokenizers:
    """Upstream's real tokenizers: ``real_tokenizer(name)`` is the folder of "minimind2" or
    "minimind3" (the test skips where it is absent); ``real_tokenizer.copy(...)`` is a writable
    copy."""

    root: Path

    def __call__(self, name: str) -> Path:
        path = self.root / name
        if not (path / "tokenizer.json").is_file():
            pytest.skip(f"real tokenizer {name!r} not available at {path} (upstream's tokenizers "
                        f"go in ../shared/minimind-tokenizers beside the repo)")
        return path

    def copy(self, dst: Path, name: str = "minimind3", **config_changes) -> Path:
        """A writable copy of tokenizer ``name`` in ``dst``; None values delete config keys."""
        import shutil

        src = self(name)
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
        config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        for key, value in config_changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return dst


@pytest.fixture(scope="session")
def real_tokenizer() -> RealTokenizers:
    """The only way a test reaches upstream's real tokenizers (see RealTokenizers)."""
    return RealTokenizers(TOKENIZERS)


_HF_TOKENIZERS: dict[str, object] = {}


def hf_tokenizer(path: Path):
    """transformers' AutoTokenizer for ``path`` (the oracle), cached per folder."""
    transformers = pytest.importorskip("transformers")
    key = str(path)
    if key not in _HF_TOKENIZERS:
        _HF_TOKENIZERS[key] = transformers.AutoTokenizer.from_pretrained(key)
    return _HF_TOKENIZERS[key]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

KINDS = {
    # kind: (generation, use_moe)
    "minimind2": (MINIMIND2, False),
    "minimind2-moe": (MINIMIND2, True),
    "minimind3": (MINIMIND3, False),
    "minimind3-moe": (MINIMIND3, True),
}


# Tiny analogues of the five released configs (FORMATS.md): each keeps its release's head and
# kv-head counts, MoE layout and upstream's FFN rule, at a small hidden size (head_dim 8-12).
RELEASE_LIKE: dict[str, tuple[str, dict]] = {
    "minimind2-small": ("minimind2", {"hidden_size": 64, "num_hidden_layers": 2}),
    "minimind2": ("minimind2", {"hidden_size": 96, "num_hidden_layers": 3}),
    "minimind2-moe": ("minimind2-moe", {"hidden_size": 80, "num_hidden_layers": 2}),
    "minimind-3": ("minimind3", {"hidden_size": 96, "num_hidden_layers": 2,
                                 "num_key_value_heads": 4}),
    "minimind-3-moe": ("minimind3-moe", {"hidden_size": 96, "num_hidden_layers": 2,
                                         "num_key_value_heads": 4}),
}


def release_like(name: str) -> tuple[str, dict]:
    """(kind, make_checkpoint overrides) for a tiny analogue of a released config."""
    from minimind_core.config import ffn_width

    kind, shape = RELEASE_LIKE[name]
    hidden = shape["hidden_size"]
    return kind, {**shape, "head_dim": hidden // 8,
                  "intermediate_size": ffn_width(KINDS[kind][0], hidden)}


def tiny_config(kind: str = "minimind2", **overrides) -> ModelConfig:
    """A small config of one of the four kinds (8 heads like every release — a bare MiniMind2
    state dict cannot tell its head count —, 2 kv heads, head_dim 16)."""
    generation, moe = KINDS[kind]
    base = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                head_dim=16, intermediate_size=192, vocab_size=512)
    if moe:
        base.update(num_experts=4, n_shared_experts=1 if generation == MINIMIND2 else 0,
                    num_experts_per_tok=2 if generation == MINIMIND2 else 1)
    base.update(overrides)
    return ModelConfig.for_generation(generation, **base)


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.08) -> dict[str, np.ndarray]:
    """Random weights under checkpoint names; norms near 1 so every term matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(config).items():
        if key.endswith("norm.weight") or "layernorm" in key:
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def build_tokenizer(folder: Path, vocab_size: int = 400, chat_template: str | None = CHATML) -> Path:
    """Train a tiny byte-level BPE with MiniMind's three special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world, how are you today?", "你好，我是一个小模型。今天天气很好。",
              "The quick brown fox jumps over the lazy dog.", "1 + 2 = 3, 10 + 20 = 30"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "model")


def save_pth(weights: dict[str, np.ndarray], path: Path, dtype=None) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def real_checkpoint(real_tokenizer):
    """real_checkpoint(root, kind, tokenizer="minimind2", seed=0, **config) -> (path, config): a
    tiny random checkpoint (vocab 6400) with upstream's real tokenizer in ``root/model``."""
    def make(root: Path, kind: str, tokenizer: str = "minimind2", seed: int = 0, **overrides):
        config = tiny_config(kind, vocab_size=6400, **overrides)
        real_tokenizer.copy(root / "model", tokenizer)
        path = save_pth(random_weights(config, seed), root / "out" / f"full_sft_{kind}.pth")
        return path, config

    return make


@pytest.fixture
def make_checkpoint(tmp_path, tokenizer_dir):
    """make_checkpoint(kind, seed=0, **config) -> (path to out/full_sft_H[_moe].pth, config, weights)."""
    def make(kind: str = "minimind2", seed: int = 0, **overrides):
        return write_checkpoint(tmp_path / f"{kind}-{seed}", tokenizer_dir, kind, seed, **overrides)

    return make


def write_checkpoint(root: Path, tokenizer_dir: Path, kind: str = "minimind2", seed: int = 0,
                     scale: float = 0.08, **overrides) -> tuple[Path, ModelConfig, dict]:
    """A random checkpoint in upstream's layout under ``root`` (``out/full_sft_H[_moe].pth``,
    the tokenizer in ``model/``): (path, config, weights). For module-scoped fixtures too."""
    import shutil

    config = tiny_config(kind, **overrides)
    weights = random_weights(config, seed, scale=scale)
    if not (root / "model").exists():
        shutil.copytree(tokenizer_dir, root / "model")
    name = f"full_sft_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth"
    return save_pth(weights, root / "out" / name), config, weights


# The server test modules each define an ``engine`` fixture; these two serve it over a socket.
@pytest.fixture(scope="module")
def server(engine):
    from server_helpers import MODEL, ServerThread

    from minimind_core.server import create_app

    with ServerThread(create_app(engine, model_name=MODEL)) as s:
        yield s


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                       timeout=30) as c:
        yield c
