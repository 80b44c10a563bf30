"""LoRA on the torch backend: unmerged (default), merged, hot-swapped and removed.

Unmerged: each ``Attention.lora`` dict gets ``{"q_proj": (A, B), "o_proj": (A, B)}`` and the forward
adds ``B (A x)``; removing the adapter empties the dicts, so the base model is untouched.
Merged: ``W += B @ A`` in place. ``q_proj.weight`` is a view into the fused ``wqkv``, so the add
lands in the fused storage too; the original rows are kept, and removing or swapping the adapter
copies them back, which restores the base weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minimind_core.lora import LoRA, LoraError, load_lora, lora_delta

from .model import Attention

if TYPE_CHECKING:  # the backend's engine; its module imports this one
    from minimind_core.engine import Engine as TorchEngine

UNMERGED_MODULES = ("q_proj", "o_proj")  # where Attention's forward applies an unmerged LoRA


def set_lora(engine: TorchEngine, lora: str | Path | LoRA | None, merge: bool = False) -> None:
    """Apply the adapter ``lora`` (a path or a read LoRA), replacing any other; None removes it.

    The adapter is read and validated before anything changes, so a bad file leaves the engine
    as it was. ``merge=True`` folds ``W + B @ A`` into the weights (faster decoding).
    """
    with engine.exclusive():
        new = None if lora is None else load_lora(lora, engine.config)
        if new is not None and not merge:
            _check_unmerged(new)
        try:
            _remove(engine)
            if new is None:
                return
            if merge:
                _merge(engine, new)
            else:
                _attach(engine, new)
            engine.lora_path = str(new.path) if new.path is not None else "<in memory>"
            engine.info["lora_merged"] = merge
        finally:  # still holding the engine: no generation can start on stale decode steps
            engine._weights_changed()


def _check_unmerged(lora: LoRA) -> None:
    for name in lora.modules:
        if name.rsplit(".", 1)[-1] not in UNMERGED_MODULES:
            raise LoraError(f"LoRA module {name}: unmerged LoRA is applied to "
                            f"{'/'.join(UNMERGED_MODULES)} only; load it with merge_lora=True")


def _attach(engine: TorchEngine, lora: LoRA) -> None:
    model = engine.model
    for name, (a, b) in lora.modules.items():
        parent, leaf = name.rsplit(".", 1)
        attn = model.get_submodule(parent)
        assert isinstance(attn, Attention), name  # validated: q_proj/o_proj live in Attention
        attn.lora[leaf] = (_tensor(a, engine), _tensor(b, engine))


@torch.no_grad()
def _merge(engine: TorchEngine, lora: LoRA) -> None:
    backup: dict[str, torch.Tensor] = {}
    for name, (a, b) in lora.modules.items():
        weight = engine.model.get_submodule(name).weight
        backup[name] = weight.detach().clone()
        # float32 sum, one rounding to the model dtype; copy_ writes through the wqkv view
        delta = torch.from_numpy(lora_delta(a, b)).to(weight.device)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    engine._lora_backup = backup


@torch.no_grad()
def _remove(engine: TorchEngine) -> None:
    for name, original in getattr(engine, "_lora_backup", {}).items():
        engine.model.get_submodule(name).weight.copy_(original)
    engine._lora_backup = {}
    for module in engine.model.modules():
        if isinstance(module, Attention):
            module.lora = {}
    engine.lora_path = None
    engine.info.pop("lora_merged", None)


def _tensor(x, engine: TorchEngine) -> torch.Tensor:
    return torch.from_numpy(x).to(device=engine.device, dtype=engine.dtype)
