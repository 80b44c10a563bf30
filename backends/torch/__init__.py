"""PyTorch backend (CPU, CUDA, MPS; fp32/fp16/bf16)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
