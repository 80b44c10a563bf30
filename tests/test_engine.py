"""The shared generation loop, driven by a scripted backend, plus load()'s plumbing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from minimind_core.config import ModelConfig
from minimind_core.engine import Engine
from minimind_core.slots import Slots
from minimind_core.tokenizer import Tokenizer


class ScriptedEngine(Engine):
    """A backend whose logits always put the next scripted token first (per row)."""

    backend = "scripted"

    def __init__(self, tokenizer, scripts, window=64):
        super().__init__(ModelConfig(vocab_size=512, max_position_embeddings=window), tokenizer)
        self.scripts = scripts
        self.decode_calls = 0
        self.started = 0  # rows prefilled so far: row i follows script i (mod the scripts)
        self.row_script: dict[int, list[int]] = {}

    def _onehot(self, slot):
        script = self.row_script[slot]
        logits = np.zeros(512, np.float32)
        logits[script[min(self.cache.lengths[slot] - self.prompt[slot], len(script) - 1)]] = 10.0
        return logits

    def _new_cache(self, slots, max_len):
        self.cache, self.prompt = Slots(slots, max_len), {}
        return self.cache

    def _prefill(self, cache, slot, ids):
        self.row_script[slot] = self.scripts[self.started % len(self.scripts)]
        self.started += 1
        cache.lengths[slot], self.prompt[slot] = len(ids), len(ids)
        return self._onehot(slot)

    def _decode_step(self, cache, slots, tokens):
        self.decode_calls += 1
        cache.lengths[slots] += 1
        return np.stack([self._onehot(s) for s in slots])

    def _logits(self, ids):
        return np.zeros((len(ids), 512), np.float32)


@pytest.fixture
def tok(tokenizer_dir):
    return Tokenizer.from_folder(tokenizer_dir)


def test_eos_stops_and_is_not_in_text(tok):
    script = tok.encode("你好 world") + [tok.eos_token_id, 5, 6]
    r = ScriptedEngine(tok, [script]).generate("hi", max_new_tokens=20)
    assert r.text == "你好 world"
    assert r.finish_reason == "stop"
    assert r.token_ids == script[:-2]
    assert r.completion_tokens == len(script) - 2
    assert r.prompt_tokens == len(tok.encode("hi"))


def test_stop_string_cut_and_generation_stops_early(tok):
    script = tok.encode("hello END more text here") + [tok.eos_token_id]
    engine = ScriptedEngine(tok, [script])
    r = engine.generate("hi", max_new_tokens=50, stop=["END"])
    assert r.text == "hello "
    assert r.finish_reason == "stop"
    assert engine.decode_calls < len(script) - 2


def test_length_finish_and_budget(tok):
    script = tok.encode("the quick brown fox jumps over the lazy dog")
    engine = ScriptedEngine(tok, [script])
    r = engine.generate("hi", max_new_tokens=4)
    assert r.finish_reason == "length" and r.completion_tokens == 4
    assert engine.decode_calls == 3  # no wasted decode after the last token
    assert r.text == tok.decode(script[:4])


def test_stream_deltas_are_utf8_safe_and_concatenate(tok):
    text = "你好，龍鳳呈祥，我是一个小模型。"  # unseen characters fall back to byte tokens
    script = tok.encode(text) + [tok.eos_token_id]
    chunks = list(ScriptedEngine(tok, [script]).stream("hi", max_new_tokens=100))
    assert all("\ufffd" not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == text
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == len(script)
    assert all(c.finish_reason is None for c in chunks[:-1])
    # byte-level merges split at least one character over several tokens here
    assert any(tok.decode([t]).endswith("\ufffd") for t in script[:-1])


def test_batch_rows_finish_independently(tok):
    a = tok.encode("short") + [tok.eos_token_id]
    b = tok.encode("a much longer answer than the first") + [tok.eos_token_id]
    results = ScriptedEngine(tok, [a, b]).generate_batch(["x", "y"], max_new_tokens=40)
    assert [r.text for r in results] == ["short", "a much longer answer than the first"]
    assert [r.finish_reason for r in results] == ["stop", "stop"]
    assert results[0].completion_tokens == len(a)


def test_context_window_guard(tok):
    engine = ScriptedEngine(tok, [[5]], window=16)
    with pytest.raises(ValueError, match="longer than the context window of 16 tokens"):
        engine.generate(list(range(3, 30)))
    # the budget is clamped to what is left of the window
    r = engine.generate(list(range(3, 13)), max_new_tokens=100)
    assert r.completion_tokens == 6 and r.finish_reason == "length"


def test_bad_prompts(tok):
    engine = ScriptedEngine(tok, [[5]])
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 99999])


def test_chat_goes_through_the_shared_formatter(tok):
    script = tok.encode("ok") + [tok.eos_token_id]
    engine = ScriptedEngine(tok, [script])
    msgs = [{"role": "user", "content": "hello"}]
    assert engine.chat_ids(msgs) == tok.encode(
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert engine.chat(msgs).text == "ok"


def test_missing_extra_names_the_pip_command(monkeypatch):
    import backends

    monkeypatch.setattr(backends, "is_installed", lambda name: False)
    with pytest.raises(ImportError, match=r"pip install 'minimind-core\[mlx\]'"):
        backends.get("mlx")
    with pytest.raises(ImportError, match="no backend is installed"):
        backends.get("auto")


def test_import_is_backend_free():
    code = ("import sys, minimind_core, minimind_core.engine, minimind_core.checkpoint, backends; "
            "print([m for m in ('torch', 'mlx', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_seeded_sampling_is_reproducible(make_checkpoint):
    pytest.importorskip("torch")
    from minimind_core import load

    path, _, _ = make_checkpoint("minimind3")
    engine = load(path, backend="torch", device="cpu")
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95)
    a = engine.generate("hello", seed=1, **kw).token_ids
    assert engine.generate("hello", seed=1, **kw).token_ids == a
    assert engine.generate("hello", seed=2, **kw).token_ids != a


def test_tokenizer_not_found_lists_paths(make_checkpoint, tmp_path):
    pytest.importorskip("torch")
    import shutil

    from minimind_core import load

    path, _, _ = make_checkpoint("minimind2")
    lonely = tmp_path / "lonely" / "w.pth"
    lonely.parent.mkdir()
    shutil.copy(path, lonely)
    with pytest.raises(FileNotFoundError, match="tokenizer") as e:
        load(lonely, backend="torch")
    assert str(lonely.parent) in str(e.value)


def test_second_generation_in_the_same_thread_is_refused(tok):
    from minimind_core.engine import EngineBusyError

    script = tok.encode("the quick brown fox jumps over the lazy dog")
    engine = ScriptedEngine(tok, [script])
    first = engine.stream("hi", max_new_tokens=8)
    next(first)
    with pytest.raises(EngineBusyError, match="already generating in this thread"):
        engine.generate("hello", max_new_tokens=2)
    rest = "".join(c.text for c in first)  # the paused stream is intact
    assert rest and engine.generate("hello", max_new_tokens=2).completion_tokens == 2
    g = engine.stream("hi", max_new_tokens=8)
    next(g)
    g.close()  # closing releases the engine
    assert engine.generate("hello", max_new_tokens=1).completion_tokens == 1


def test_other_threads_wait_for_the_engine(tok):
    import threading

    engine = ScriptedEngine(tok, [tok.encode("abc def ghi")])
    first = engine.stream("hi", max_new_tokens=6)
    next(first)
    done = []
    t = threading.Thread(target=lambda: done.append(engine.generate("x", max_new_tokens=2)))
    t.start()
    t.join(0.3)
    assert not done  # waiting, not interleaving
    list(first)
    t.join(5)
    assert done and done[0].completion_tokens == 2


def test_arguments_are_checked_at_the_call_not_at_first_next(tok):
    engine = ScriptedEngine(tok, [[5]], window=16)
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        engine.stream("hi", temprature=1)
    with pytest.raises(ValueError, match="longer than the context window"):
        engine.stream_chat([{"role": "user", "content": "word " * 40}])
    with pytest.raises(ValueError, match="longer than the context window of 16"):
        engine.logits(list(range(3, 30)))


def test_chat_drops_old_turns_to_leave_room_for_the_reply(tok):
    engine = ScriptedEngine(tok, [tok.encode("ok")], window=64)
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question number {i} here"},
                  {"role": "assistant", "content": f"answer number {i} there"}]
    msgs = turns + [{"role": "user", "content": "last one"}]
    ids = engine.chat_ids(msgs, max_new_tokens=20)
    assert len(ids) <= 64 - 20
    assert ids[-8:] == engine.chat_ids(msgs[-1:], max_new_tokens=20)[-8:]  # the question is kept


def test_iter_tokens_ignores_eos_and_stops_at_the_budget(tok):
    script = tok.encode("ab") + [tok.eos_token_id] + tok.encode("cd")
    steps = list(ScriptedEngine(tok, [script]).iter_tokens(["hi"], max_new_tokens=4))
    assert [int(s[0]) for s in steps] == script[:4]


def test_cpu_threads_follow_model_size():
    pytest.importorskip("torch")
    import os

    from backends.torch.engine import cpu_threads

    assert cpu_threads(460_000, None) == 1  # the demo: one thread
    assert cpu_threads(26_000_000, None) == min(2, os.cpu_count())
    assert cpu_threads(26_000_000, 3) == 3
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        cpu_threads(1, 0)
