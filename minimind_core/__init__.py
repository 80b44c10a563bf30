"""minimind-core: run MiniMind language models on PyTorch and Apple MLX with one API.

    from minimind_core import load
    engine = load("out/full_sft_512.pth", backend="auto")
    print(engine.chat([{"role": "user", "content": "你好"}]).text)
"""

from __future__ import annotations

from typing import Any

from .loader import load
from .params import GenerationResult, SamplingParams, StreamChunk, Usage
from .version import __version__

__all__ = ["load", "SamplingParams", "GenerationResult", "StreamChunk", "Usage", "__version__"]


def __getattr__(name: str) -> Any:
    # Heavier names load on first use, so `import minimind_core` stays fast.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "ChatFormatter":
        from .chat import ChatFormatter

        return ChatFormatter
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'minimind_core' has no attribute {name!r}")
