"""The ``minimind`` CLI's parts without a model: upstream flag resolution, the shared flags,
terminal rendering, the chat REPL and the bench loop on scripted engines.

References are hand-made: file layouts given as sets of paths, expected ANSI sequences written
out, scripted replies whose history and printing are checked literally.
"""

from __future__ import annotations

import io
import types
from pathlib import Path

import numpy as np
import pytest

from minimind_core.cli import bench as bench_cmd
from minimind_core.cli import common, upstream
from minimind_core.cli.chat import ChatSession, chat_loop, read_line_from
from minimind_core.cli.render import DIM, RESET, ThinkStyler, ends_in_think
from minimind_core.params import StreamChunk, Usage

# ---- upstream eval_llm.py flags (pure) ---------------------------------------------------------

def fake_exists(*paths: str):
    present = {Path(p) for p in paths}
    return lambda p: Path(p) in present


def test_upstream_none_when_no_flag():
    assert upstream.resolve_upstream() is None
    assert upstream.resolve_upstream(lora_weight="None") is None


def test_upstream_weight_hidden_moe():
    up = upstream.resolve_upstream(save_dir="out", weight="full_sft", hidden_size=512, use_moe=1,
                                   exists=fake_exists("out/full_sft_512_moe.pth"))
    assert up.model == Path("out/full_sft_512_moe.pth") and up.lora is None and not up.pretrain


def test_upstream_defaults_try_512_then_768():
    up = upstream.resolve_upstream(weight="full_sft", exists=fake_exists("out/full_sft_768.pth"))
    assert up.model == Path("out/full_sft_768.pth")
    both = fake_exists("out/full_sft_512.pth", "out/full_sft_768.pth")
    assert upstream.resolve_upstream(save_dir="out", exists=both).model == Path("out/full_sft_512.pth")
    with pytest.raises(FileNotFoundError, match=r"out/full_sft_512\.pth or out/full_sft_768\.pth"):
        upstream.resolve_upstream(save_dir="out", exists=fake_exists())


def test_upstream_lora_in_lora_folder_then_save_dir():
    files = ("out/full_sft_512.pth", "out/lora/lora_identity_512.pth", "out/lora_medical_512.pth")
    up = upstream.resolve_upstream(save_dir="out", lora_weight="lora_identity", exists=fake_exists(*files))
    assert up.lora == Path("out/lora/lora_identity_512.pth")
    up = upstream.resolve_upstream(save_dir="out", lora_weight="lora_medical", exists=fake_exists(*files))
    assert up.lora == Path("out/lora_medical_512.pth")  # older upstream revisions
    up = upstream.resolve_upstream(save_dir="out", lora_weight="None", exists=fake_exists(*files))
    assert up.lora is None
    with pytest.raises(FileNotFoundError, match=r"out/lora/lora_x_512\.pth"):
        upstream.resolve_upstream(save_dir="out", lora_weight="lora_x", exists=fake_exists(*files))


def test_upstream_lora_follows_the_hidden_size_found():
    files = ("out/full_sft_768.pth", "out/lora/lora_identity_768.pth")
    up = upstream.resolve_upstream(lora_weight="lora_identity", exists=fake_exists(*files))
    assert up.model == Path("out/full_sft_768.pth") and up.lora == Path("out/lora/lora_identity_768.pth")


def test_upstream_load_from():
    files = ("out/pretrain_512.pth", "../minimind/model/tokenizer.json", "MiniMind2")
    up = upstream.resolve_upstream(load_from="../minimind/model", weight="pretrain",
                                   exists=fake_exists(*files))
    assert up.model == Path("out/pretrain_512.pth") and up.pretrain
    assert up.tokenizer == Path("../minimind/model")
    up = upstream.resolve_upstream(load_from="model", weight="pretrain", exists=fake_exists(*files))
    assert up.tokenizer is None  # the default ./model is found by the usual search
    up = upstream.resolve_upstream(load_from="MiniMind2", exists=fake_exists(*files))
    assert up.model == Path("MiniMind2")  # a transformers folder
    with pytest.raises(FileNotFoundError, match="no such transformers folder"):
        upstream.resolve_upstream(load_from="minimind-3", exists=fake_exists(*files))


def test_historys_to_turns():
    assert [upstream.historys_to_turns(n) for n in (0, 1, 2, 4, 7)] == [0, 0, 1, 2, 3]


# ---- shared flags (pure) -----------------------------------------------------------------------

def parse(*argv: str):
    parser = common.ArgumentParser(prog="t")
    common.add_model_args(parser)
    common.add_sampling_args(parser)
    return parser.parse_args(list(argv))


def test_arch_overrides_cover_config_fields():
    names = {n for n, _ in common.override_fields()}
    assert {"num_experts_per_tok", "rms_norm_eps", "rope_theta", "num_attention_heads",
            "hidden_size", "num_hidden_layers", "norm_topk_prob", "rope_scaling"} <= names
    args = parse("--num-experts-per-tok", "1", "--rms-norm-eps", "1e-6", "--norm-topk-prob", "false",
                 "--rope-scaling", '{"type": "yarn", "factor": 4}', "--hidden_size", "768",
                 "--inference_rope_scaling")
    assert common.arch_overrides(args) == {
        "num_experts_per_tok": 1, "rms_norm_eps": 1e-6, "norm_topk_prob": False,
        "rope_scaling": {"type": "yarn", "factor": 4}, "hidden_size": 768,
        "inference_rope_scaling": True}
    assert common.arch_overrides(parse()) == {}


# The ModelConfig fields as upstream's scripts spell them, with a value for each (written by hand).
UNDERSCORE_OVERRIDES = {
    "--hidden_size": ("768", 768), "--num_hidden_layers": ("16", 16),
    "--num_attention_heads": ("8", 8), "--num_key_value_heads": ("2", 2), "--head_dim": ("96", 96),
    "--intermediate_size": ("2432", 2432), "--vocab_size": ("6400", 6400),
    "--rms_norm_eps": ("1e-6", 1e-6), "--rope_theta": ("10000", 10000.0),
    "--max_position_embeddings": ("32768", 32768), "--num_experts": ("4", 4),
    "--num_experts_per_tok": ("1", 1), "--n_shared_experts": ("1", 1),
    "--norm_topk_prob": ("false", False), "--rope_scaling": ('{"type": "yarn", "factor": 4}', {"type": "yarn", "factor": 4}),
}


@pytest.mark.parametrize("flag", sorted(UNDERSCORE_OVERRIDES))
def test_every_override_has_its_underscore_spelling(flag):
    text, value = UNDERSCORE_OVERRIDES[flag]
    field = flag[2:]
    assert common.arch_overrides(parse(flag, text)) == {field: value}
    assert common.arch_overrides(parse(flag.replace("_", "-"), text)) == {field: value}


def test_underscore_spellings_cover_every_override():
    assert {"--" + n for n, _ in common.override_fields()} == set(UNDERSCORE_OVERRIDES)


def test_upstream_and_dashed_spellings_are_one_flag():
    a = parse("--top_p", "0.85", "--max_new_tokens", "7", "--temperature", "0.85")
    b = parse("--top-p", "0.85", "--max-new-tokens", "7", "--temp", "0.85")
    assert common.sampling_kwargs(a) == common.sampling_kwargs(b)
    assert common.sampling_kwargs(a)["max_new_tokens"] == 7


def test_quantize_kwargs(monkeypatch):
    monkeypatch.setattr(common, "apple_silicon", lambda: True)
    assert common.quantize_kwargs(parse("--backend", "mlx"), "mlx", is_demo=False) == {"quantize": 4}
    assert common.quantize_kwargs(parse(), "mlx", is_demo=True) == {}
    assert common.quantize_kwargs(parse("--q-bits", "0"), "mlx", is_demo=False) == {}
    assert common.quantize_kwargs(parse("--q-bits", "8", "--q-group-size", "32"), "mlx",
                                  is_demo=False) == {"quantize": 8, "q_group_size": 32}
    monkeypatch.setattr(common, "apple_silicon", lambda: False)
    assert common.quantize_kwargs(parse(), "mlx", is_demo=False) == {}  # Linux: full precision
    assert common.quantize_kwargs(parse("--q-bits", "0"), "torch", is_demo=False) == {}
    assert common.quantize_kwargs(parse("--q-bits", "4", "--q-group-size", "32"), "torch",
                                  is_demo=False) == {"quantize": 4, "q_group_size": 32}
    assert common.quantize_kwargs(parse(), "torch", is_demo=False) == {}  # torch: never by default
    with pytest.raises(ValueError, match="needs --q-bits"):
        common.quantize_kwargs(parse("--q-group-size", "32"), "torch", is_demo=False)


# ---- terminal rendering ------------------------------------------------------------------------

def test_think_styler_splits_tags_across_deltas():
    s = ThinkStyler(True)
    out = "".join(s.feed(p) for p in ["a<th", "ink>b</thi", "nk>c"]) + s.finish()
    assert out == f"a{DIM}<think>b</think>{RESET}c"


def test_think_styler_starts_inside_and_resets_at_end():
    s = ThinkStyler(True, inside=True)
    assert s.feed("x</think>y") + s.finish() == f"{DIM}x</think>{RESET}y"
    s = ThinkStyler(True)
    assert s.feed("<think>still thinking <th") + s.finish() == f"{DIM}<think>still thinking <th{RESET}"
    s = ThinkStyler(False, inside=True)
    assert s.feed("<think>x</think>") + s.finish() == "<think>x</think>"


def test_ends_in_think():
    assert ends_in_think("<|im_start|>assistant\n<think>\n")
    assert not ends_in_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not ends_in_think("no tags")


# ---- chat REPL on a scripted engine ------------------------------------------------------------

class ScriptedEngine:
    """Records the conversations it is asked about and streams scripted replies."""

    def __init__(self, replies: list[str], interrupt_after: int | None = None):
        self.replies = list(replies)
        self.calls: list[dict] = []
        self.closed = 0
        self.generators = []
        self.interrupt_after = interrupt_after
        self.formatter = types.SimpleNamespace(render=lambda messages, **kw: "")

    def stream_chat(self, messages, params, *, max_history=None, template_kwargs=None):
        self.calls.append({"messages": [dict(m) for m in messages], "max_history": max_history,
                           "template_kwargs": template_kwargs})
        text = self.replies.pop(0)

        def chunks():
            try:
                for i, ch in enumerate(text):
                    if self.interrupt_after is not None and i == self.interrupt_after:
                        raise KeyboardInterrupt
                    yield StreamChunk(ch, 100 + i)
                yield StreamChunk("", None, finish_reason="stop", usage=Usage(7, len(text)),
                                  tokens_per_second=12.5, time_to_first_token=0.01)
            finally:
                self.closed += 1

        gen = chunks()
        self.generators.append(gen)  # held, so only an explicit close() runs its finally
        return gen

    def chat_ids(self, messages, *, max_history=None, max_new_tokens=0, **template_kwargs):
        """One "token" per character of the contents (the real one is tested in test_cli)."""
        return [0] * sum(len(m["content"]) for m in messages)


def drive(engine, lines: str, session: ChatSession | None = None, out=None):
    session = session or ChatSession()
    out = out or io.StringIO()
    err = io.StringIO()
    stdin = io.StringIO(lines)
    replies = chat_loop(engine, session, read_line_from(stdin, out), out, err)
    return replies, session, out.getvalue(), err.getvalue()


def test_chat_loop_history_clear_and_quit():
    engine = ScriptedEngine(["one", "two", "three", "never"])
    n, session, out, err = drive(engine, "hi\n\nagain\n/clear\nthird\nquit\nnot read\n")
    assert n == 3
    assert [len(c["messages"]) for c in engine.calls] == [1, 3, 1]
    assert engine.calls[1]["messages"] == [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "one"},
                                           {"role": "user", "content": "again"}]
    assert out == "one\ntwo\nthree\n"
    assert "(history cleared)" in err
    assert err.count("[3 tokens, 12.5 tok/s, prompt 7 tokens]") == 2  # "one", "two"
    assert session.messages == [{"role": "user", "content": "third"},
                                {"role": "assistant", "content": "three"}]


@pytest.mark.parametrize("leave", ["quit", "exit", "q", "clear\nexit", ""])
def test_chat_loop_leaves(leave):
    engine = ScriptedEngine(["a"])
    n, *_ = drive(engine, f"hello\n{leave}\nnever\n" if leave else "hello\n")  # "" = Ctrl-D (EOF)
    assert n == 1 and len(engine.calls) == 1


def test_chat_loop_system_history_quiet():
    engine = ScriptedEngine(["a", "b"])
    session = ChatSession(system="be brief", max_history=1, quiet=True,
                          template_kwargs={"open_thinking": True})
    _, _, _, err = drive(engine, "x\ny\n", session)
    assert engine.calls[1]["messages"][0] == {"role": "system", "content": "be brief"}
    assert engine.calls[1]["max_history"] == 1
    assert engine.calls[1]["template_kwargs"] == {"open_thinking": True}
    assert err == ""  # --quiet: no stats lines


def test_ctrl_c_inside_generation_stops_that_reply_only():
    engine = ScriptedEngine(["abcdef", "ok"], interrupt_after=3)
    n, session, out, err = drive(engine, "first\nsecond\n")
    assert n == 2 and engine.closed == 2
    assert out.startswith("abc\n")
    assert "(reply stopped)" in err and "[stopped: " in err
    assert "prompt 5 tokens]" in err  # "first": the prompt it was given, not 0
    assert session.messages[1] == {"role": "assistant", "content": "abc"}  # what was shown


class InterruptingOut(io.StringIO):
    """A terminal where Ctrl-C lands while the second piece of a reply is printed."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        if self.writes == 2:
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_while_printing_closes_the_generation():
    engine = ScriptedEngine(["abcdef", "ok"])
    n, session, out, err = drive(engine, "first\nsecond\n", out=InterruptingOut())
    assert n == 2
    assert engine.closed == 2  # the interrupted generator was closed, freeing the engine
    assert "(reply stopped)" in err
    assert session.messages[3] == {"role": "assistant", "content": "ok"}


def test_ctrl_c_at_the_prompt_keeps_the_session():
    engine = ScriptedEngine(["a"])
    lines = iter([KeyboardInterrupt, "hello", None])

    def read():
        item = next(lines)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    err = io.StringIO()
    assert chat_loop(engine, ChatSession(), read, io.StringIO(), err) == 1
    assert "Ctrl-D" in err.getvalue()


def test_thinking_is_dimmed_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    engine = ScriptedEngine(["<think>hmm</think>42"])
    _, _, out, _ = drive(engine, "q?\n", out=Tty())
    assert out == f"{DIM}<think>hmm</think>{RESET}42\n"
    monkeypatch.setenv("NO_COLOR", "1")
    engine = ScriptedEngine(["<think>hmm</think>42"])
    _, _, out, _ = drive(engine, "q?\n", out=Tty())
    assert out == "<think>hmm</think>42\n"


def test_no_stream_prints_whole_reply():
    engine = ScriptedEngine(["whole"])
    _, _, out, _ = drive(engine, "x\n", ChatSession(stream=False))
    assert out == "whole\n"


# ---- bench timing loop (scripted) ----------------------------------------------------------------

def test_bench_times_every_step_regardless_of_eos():
    class StepEngine:  # only the public API: no _lock, no _steps
        config = types.SimpleNamespace(max_position_embeddings=4096, vocab_size=50)

        def __init__(self):
            self.steps = 0
            self.prompts = []
            self.open = 0

        def iter_tokens(self, prompts, params=None, **sampling):
            assert params.temperature == 0.0 and not sampling
            self.prompts.append(prompts)
            self.open += 1
            try:
                for _ in range(params.max_new_tokens):
                    self.steps += 1
                    yield np.full(len(prompts), 2)  # always eos: bench must not stop early
            finally:
                self.open -= 1

    engine = StepEngine()
    rows = bench_cmd.bench(engine, (1, 3), prompt_tokens=20, gen_tokens=6)
    assert engine.steps == 4 + 6 + 6  # warm-up 4, then the full budget for each batch size
    assert [len(p) for p in engine.prompts] == [3, 1, 3]
    assert all(len(row) == 20 for row in engine.prompts[2])
    assert all(3 <= t < 50 for row in engine.prompts[2] for t in row)
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["decode_tokens_per_second"] > 0 for r in rows)
    assert engine.open == 0  # every token loop was closed
    with pytest.raises(ValueError, match="context window"):
        bench_cmd.bench(engine, (1,), prompt_tokens=4000, gen_tokens=200)
