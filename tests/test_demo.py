"""The embedded demo model: shipped files, format, and held-out arithmetic under greedy decoding."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from minimind_core import demo

# the corpus generator lives beside examples/train_demo_model.py, outside the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import demo_corpus as corpus  # noqa: E402

MAX_DEMO_BYTES = 5 * 1024 * 1024
N_ASKED = 100  # a spread-out subset keeps the test fast; the training script checks all of them


def _folder():
    return demo.demo_model_path()  # the demo ships with the package: missing files are a failure


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("torch")
    import minimind_core

    return minimind_core.load(backend="torch")  # no path: the demo


def test_folder_is_small_and_says_demo():
    folder = _folder()
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= MAX_DEMO_BYTES, f"demo folder is {size} bytes"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["demo"] is True
    assert "demo" in config["description"] and "not a real MiniMind" in config["description"]
    assert config["model_type"] == "minimind"


def test_weights_use_upstream_names_and_match_config():
    from minimind_core.checkpoint import expected_shapes, load_checkpoint

    folder = _folder()
    ckpt = load_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "generation"):
        assert getattr(ckpt.config, key) == config[key], key
    assert set(ckpt.weights) == set(expected_shapes(ckpt.config))
    assert ckpt.file_dtype == "float16"


def test_tokenizer_special_ids_and_template_match_training_format():
    from minimind_core.chat import ChatFormatter
    from minimind_core.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(_folder())
    assert [tok.token_to_id(t) for t in corpus.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token_id == 2 and 2 in tok.stop_token_ids
    # what the engine renders at inference is exactly what the model was trained on
    fmt = ChatFormatter(tok)
    for msgs in ([{"role": "user", "content": "What is 3 + 4?"}],
                 [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                  {"role": "user", "content": "12-5"}]):
        assert fmt.render(msgs) == corpus.render(msgs, add_generation_prompt=True)
    assert tok.decode(tok.encode("12 + 34 = 46。你好")) == "12 + 34 = 46。你好"


FINAL = re.compile(r"(?:^|So )(\d+) ([+-]) (\d+) = (\d+)\.?$")  # the reply's final equation


def test_held_out_pairs_never_in_training():
    seen = set()
    for conv in corpus.training_conversations():
        for m in conv:
            match = FINAL.search(m["content"]) if m["role"] == "assistant" else None
            if match:
                a, op, b = int(match[1]), match[2], int(match[3])
                seen.add((op, min(a, b), max(a, b)))
    assert len(seen) > 9000  # the parse found the training sums (unordered pairs)
    questions = corpus.held_out_questions()
    assert len(questions) >= 500
    for question, answer in questions:
        match = FINAL.search(answer)
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        assert (op, min(a, b), max(a, b)) not in seen, question
        # the expected reply ends in the right result, about the numbers in the question
        assert result == (a + b if op == "+" else a - b)
        assert sorted(map(int, re.findall(r"\d+", question))) == sorted((a, b))


def test_worked_answers_follow_column_arithmetic():
    # hand-written references for the reply format (carry, borrow, single digits)
    assert corpus.arithmetic_answer("+", 47, 38) == (
        "47 + 38: 7 + 8 = 15, carry 1; 4 + 3 + 1 = 8. So 47 + 38 = 85.")
    assert corpus.arithmetic_answer("+", 3, 45) == "3 + 45: 3 + 5 = 8. So 3 + 45 = 48."
    assert corpus.arithmetic_answer("-", 52, 48) == (
        "52 - 48: 12 - 8 = 4, borrow 1; 5 - 1 - 4 = 0. So 52 - 48 = 4.")
    assert corpus.arithmetic_answer("-", 7, 3) == "7 - 3 = 4"


@pytest.mark.torch
def test_held_out_arithmetic_is_answered_exactly(engine):
    questions = corpus.held_out_questions()
    step = max(1, len(questions) // N_ASKED)
    asked = questions[::step][:N_ASKED]
    wrong = []
    for question, want in asked:
        got = engine.chat([{"role": "user", "content": question}], max_new_tokens=64,
                          temperature=0).text.strip()
        if got != want:
            wrong.append((question, want, got))
    accuracy = 1 - len(wrong) / len(asked)
    assert accuracy >= 0.9, f"{accuracy:.0%} exact; e.g. {wrong[:5]}"


@pytest.mark.torch
def test_demo_says_what_it_is(engine):
    reply = engine.chat([{"role": "user", "content": "Who are you?"}], max_new_tokens=80).text
    assert "demo" in reply.lower()
    assert engine.info["path"] == str(demo.demo_model_path())


def test_missing_files_give_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_demo_model.py"):
        demo.demo_model_path()
