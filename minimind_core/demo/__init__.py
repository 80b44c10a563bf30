"""The embedded demo model: a tiny MiniMind-3-format model trained by
``examples/train_demo_model.py`` on a corpus that ``examples/demo_corpus.py`` generates (greetings, who-are-you, additions and
subtractions up to 99, a few facts). It lets ``minimind_core.load()`` and every CLI command work
offline with no download. It is a demo, not a real MiniMind model.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_DESCRIPTION", "DEMO_DIR", "DEMO_HISTORY", "DEMO_TEMPERATURE", "demo_model_path",
           "is_demo"]

DEMO_DIR = Path(__file__).resolve().parent
DEMO_DESCRIPTION = (
    "minimind-core's embedded demo model: a tiny MiniMind-3-format model trained in minutes on a "
    "CPU by examples/train_demo_model.py. It greets, introduces itself, adds and subtracts whole "
    "numbers up to 99 and knows a few facts. It is a demo, not a real MiniMind model.")
# What the demo was trained on (examples/demo_corpus.py): single exchanges and a few two-turn
# ones, answers with one right text. Kept history loses it from the third turn; sampling only
# adds wrong digits. So its defaults in `minimind chat` and `minimind serve` are these.
DEMO_HISTORY = 0  # earlier turns kept in the prompt
DEMO_TEMPERATURE = 0.0  # greedy
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_model_path() -> Path:
    """The folder holding the demo model (config.json, model.safetensors, tokenizer files).

    Raises:
        FileNotFoundError: the files are missing (e.g. a source checkout before training).
    """
    missing = [name for name in _FILES if not (DEMO_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded demo model is missing {', '.join(missing)} in {DEMO_DIR}; "
            f"create it with: python examples/train_demo_model.py (or pass a model path)")
    return DEMO_DIR


def is_demo(path: str | Path | None) -> bool:
    """Whether ``path`` (a model folder or a file in one) is the demo model or a copy of it: its
    config.json says ``"demo": true``."""
    if path is None:
        return False
    folder = Path(path)
    config = (folder if folder.is_dir() else folder.parent) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("demo") is True
    except (OSError, ValueError, AttributeError):
        return False
