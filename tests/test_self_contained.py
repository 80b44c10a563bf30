"""The suite runs from a bare clone: only conftest.py under tests/ reaches the folder of real
tokenizers beside the repo, and every other test gets them from its ``real_tokenizer`` fixture,
which skips where they are absent. So without that folder the suite passes, and every extra
skip comes from that one fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import RealTokenizers, build_tokenizer, shared_folder_mentions

TESTS = Path(__file__).resolve().parent
CONFTEST = TESTS / "conftest.py"


def files_under_tests() -> list[Path]:
    """Every file under tests/ but caches."""
    return [p for p in sorted(TESTS.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def test_no_test_file_but_conftest_names_the_shared_folder():
    offenders = {str(p.relative_to(TESTS)): found for p in files_under_tests() if p != CONFTEST
                 and (found := shared_folder_mentions(p.read_text("utf-8", errors="replace")))}
    assert offenders == {}, ("reach upstream's tokenizers through conftest's real_tokenizer "
                             f"fixture, not directly: {offenders}")


def test_the_check_sees_the_one_file_that_does_reach_it():
    # conftest.py climbs from __file__ to the folder beside the repo: the check flags that line
    found = shared_folder_mentions(CONFTEST.read_text("utf-8"))
    assert any("__file__" in line and "parents[2]" in line for line in found), found


def test_the_check_lets_the_word_pass_in_other_senses():
    text = ("n_shared_experts = 1\n\"\"\"Helpers shared by the CLI test modules.\"\"\"\n"
            "# ---- shared flags (pure) ----\nROOT = Path(__file__).resolve().parents[1]\n"
            "assert str(base.parents[2] / 'model') not in msg\n")
    assert shared_folder_mentions(text) == []


def test_the_fixture_skips_without_the_folder_and_copies_with_it(tmp_path):
    tokenizers = RealTokenizers(tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="'minimind3' not available at .*absent"):
        tokenizers("minimind3")
    # with a folder in place (here a tiny trained tokenizer standing in for upstream's)
    build_tokenizer(tmp_path / "present" / "minimind3")
    tokenizers = RealTokenizers(tmp_path / "present")
    assert tokenizers("minimind3") == tmp_path / "present" / "minimind3"
    copy = tokenizers.copy(tmp_path / "copy", eos_token="<x>", chat_template=None)
    config = json.loads((copy / "tokenizer_config.json").read_text("utf-8"))
    assert config["eos_token"] == "<x>" and "chat_template" not in config
    assert config["bos_token"] == "<|im_start|>"
    assert (copy / "tokenizer.json").read_bytes() == (
        tmp_path / "present" / "minimind3" / "tokenizer.json").read_bytes()
