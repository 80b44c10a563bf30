"""The suite runs from a bare clone: only conftest.py under tests/ reaches the folder of real
tokenizers beside the repo, and every other test gets them from its ``real_tokenizer`` fixture,
which skips where they are absent. So without that folder the suite passes, and every extra
skip comes from that one fixture."""

from __future__ import annotations

from pathlib import Path

from conftest import shared_folder_mentions

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
