"""Helpers shared by the CLI test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from minimind_core.cli.entry import main

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="loading .pth files needs torch")


def _demo_ready() -> bool:
    if importlib.util.find_spec("minimind_core.demo") is None:
        return False
    try:
        from minimind_core.demo import demo_model_path

        demo_model_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


needs_demo = pytest.mark.skipif(not _demo_ready(), reason="the embedded demo model is not built yet")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minimind: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def chatml(*turns: tuple[str, str]) -> str:
    """The conftest ChatML template rendered by hand, with the generation prompt."""
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"


def raw_tokenizer(root: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(root / "model" / "tokenizer.json"))
