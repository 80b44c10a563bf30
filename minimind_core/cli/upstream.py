"""Upstream ``eval_llm.py`` flags → the files they name (a pure function, so it is easy to test).

MiniMind users type ``python eval_llm.py --save_dir out --weight full_sft --hidden_size 512
--use_moe 1 --lora_weight lora_identity``; the same flags work on every ``minimind`` command:

- ``--load_from model`` (upstream's default: "native .pth weights, tokenizer in ./model") reads
  ``{save_dir}/{weight}_{hidden_size}[_moe].pth``; any other value is a transformers folder.
- ``--lora_weight NAME`` reads ``{save_dir}/lora/NAME_{hidden_size}.pth`` (older upstream
  revisions kept it at ``{save_dir}/NAME_{hidden_size}.pth``; that is tried second).
  ``--lora_weight None`` (upstream's default) means no LoRA.
- ``--hidden_size`` defaults to 512 (MiniMind2) and then 768 (MiniMind-3): the first file that
  exists wins, so both generations work without the flag.
- eval_llm.py's architecture flags alone (``--hidden_size 512``, ``--use_moe 1``, no --model)
  name its default file ``out/full_sft_512[_moe].pth``, as they do there (``cli/common.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NATIVE = "model"  # upstream's --load_from default: native weights, tokenizer in ./model
DEFAULT_SAVE_DIR = "out"
DEFAULT_WEIGHT = "full_sft"
DEFAULT_HIDDEN = (512, 768)  # MiniMind2's default, then MiniMind-3's
# eval_llm.py's "[0] 自动测试" (auto test) mode asks these, in this order (`minimind chat --auto`).
PRESET_QUESTIONS = (
    "你有什么特长？",
    "为什么天空是蓝色的",
    "请用Python写一个计算斐波那契数列的函数",
    '解释一下"光合作用"的基本过程',
    "如果明天下雨，我应该如何出门",
    "比较一下猫和狗作为宠物的优缺点",
    "解释什么是机器学习",
    "推荐一些中国的美食",
)


@dataclass(frozen=True)
class UpstreamPaths:
    """What upstream-style flags resolve to."""

    model: Path
    lora: Path | None = None
    tokenizer: Path | None = None  # None: found beside the weights / in ../model as usual
    pretrain: bool = False  # upstream feeds pretrain weights bos + raw prompt, no chat template


def is_native(load_from: str) -> bool:
    """Whether ``--load_from`` means upstream's native .pth weights (its tokenizer folder)."""
    return load_from == NATIVE or Path(load_from).name == NATIVE


def resolve_upstream(load_from: str | None = None, save_dir: str | None = None,
                     weight: str | None = None, lora_weight: str | None = None,
                     hidden_size: int | None = None, use_moe: int | bool | None = None, *,
                     exists: Callable[[Path], bool] = os.path.exists) -> UpstreamPaths | None:
    """Resolve upstream ``eval_llm.py`` flags to files; None when none of them was given.

    ``exists`` is the file test (injectable for tests). Raises FileNotFoundError naming every
    path tried when the weights or the LoRA file are not there.
    """
    if load_from is None and save_dir is None and weight is None and (
            lora_weight is None or lora_weight == "None"):
        return None
    load_from = NATIVE if load_from is None else load_from
    save = Path(save_dir if save_dir is not None else DEFAULT_SAVE_DIR)
    weight = weight if weight is not None else DEFAULT_WEIGHT
    hiddens = (hidden_size,) if hidden_size is not None else DEFAULT_HIDDEN
    suffix = "_moe" if use_moe else ""

    tokenizer: Path | None = None
    if is_native(load_from):
        tried = [save / f"{weight}_{h}{suffix}.pth" for h in hiddens]
        found = [(h, p) for h, p in zip(hiddens, tried, strict=True) if exists(p)]
        if not found:
            names = " or ".join(str(p) for p in tried)
            raise FileNotFoundError(
                f"upstream flags point to {names}, which does not exist; check --save_dir, "
                f"--weight, --hidden_size and --use_moe (or pass --model PATH)")
        hidden, model = found[0]
        # An explicit --load_from folder is upstream's tokenizer folder; the default "model" is
        # found by the usual search (./model beside ./out).
        if load_from != NATIVE and exists(Path(load_from) / "tokenizer.json"):
            tokenizer = Path(load_from)
    else:
        model = Path(load_from)
        if not exists(model):
            raise FileNotFoundError(f"--load_from {load_from}: no such transformers folder")
        hidden = hiddens[0]

    lora = None
    if lora_weight is not None and lora_weight != "None":
        tried = [save / "lora" / f"{lora_weight}_{hidden}.pth", save / f"{lora_weight}_{hidden}.pth"]
        lora = next((p for p in tried if exists(p)), None)
        if lora is None:
            raise FileNotFoundError(
                f"--lora_weight {lora_weight}: neither {tried[0]} nor {tried[1]} exists; check "
                f"--save_dir and --hidden_size (or pass --lora PATH)")
    return UpstreamPaths(model, lora, tokenizer, pretrain="pretrain" in weight)


def historys_to_turns(historys: int) -> int:
    """Upstream's ``--historys N`` keeps the last N messages (user + assistant): N // 2 turns."""
    if historys < 0:
        raise ValueError(f"--historys must be >= 0, got {historys}")
    return historys // 2
