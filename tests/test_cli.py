"""The ``minimind`` CLI: in-process through ``main([...])`` and as real subprocesses, on the tiny
random checkpoints of conftest (``<root>/out/full_sft_128[_moe].pth``, tokenizer in ``<root>/model``).

References are independent of the CLI: prompts are rendered by hand from the ChatML template and
tokenized with the ``tokenizers`` library directly, parameter counts are summed from the weights,
the first greedy token is the argmax of the engine's full-sequence logits, stop strings are cut
with plain string operations.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import (
    ROOT,
    assert_one_line_error,
    chatml,
    needs_demo,
    needs_torch,
    raw_tokenizer,
    run,
)

from minimind_core import __version__
from minimind_core.cli import common
from minimind_core.cli.entry import main

# ---- version and help ------------------------------------------------------------------------

def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"minimind {__version__}"


def test_no_command_prints_usage(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "generate" in err and "chat" in err


@pytest.mark.parametrize("command", ["generate", "chat", "info", "bench", "convert", "serve"])
def test_help_of_every_command(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"minimind {command}" in out


def test_version_subprocess():
    proc = subprocess.run([sys.executable, "-m", "minimind_core", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"minimind {__version__}"


# ---- real tiny checkpoints -----------------------------------------------------------------------

@needs_torch
def test_info_fields_match_the_checkpoint(capsys, make_checkpoint):
    path, config, weights = make_checkpoint("minimind2-moe")
    root = path.parents[1]
    code, out, err = run(capsys, "info", path, "--json")
    assert code == 0, err
    d = json.loads(out)
    total = sum(w.size for w in weights.values())
    expert = sum(weights[f"model.layers.0.mlp.experts.0.{p}_proj.weight"].size
                 for p in ("gate", "up", "down"))
    assert d["parameters"] == total
    assert d["active_parameters"] == total - 2 * (4 - 2) * expert  # 2 layers, 2 of 4 experts idle
    assert (d["generation"], d["moe"], d["kind"]) == ("minimind2", True, "minimind2-moe")
    assert (d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
            d["num_key_value_heads"], d["head_dim"], d["intermediate_size"]) == (128, 2, 8, 2, 16, 192)
    assert (d["num_experts"], d["num_experts_per_tok"], d["n_shared_experts"]) == (4, 2, 1)
    assert d["vocab_size"] == 512 and d["tie_word_embeddings"] is True
    assert d["file_dtype"] == "float32" and d["file_size"] == os.path.getsize(path)
    assert Path(d["tokenizer"]).resolve() == (root / "model").resolve() and d["chat_template"]
    assert d["demo"] is False and d["num_attention_heads_assumed"] is True

    code, text, _ = run(capsys, "info", path)
    assert code == 0
    for fragment in ("MiniMind2 MoE", "4 routed, top-2, 1 shared", "float32", "chat template: yes"):
        assert fragment in text
    assert "DEMO MODEL" not in text


@needs_torch
def test_info_minimind3_and_overrides(capsys, make_checkpoint):
    path, config, weights = make_checkpoint("minimind3-moe")
    code, out, err = run(capsys, "info", "-m", path, "--json", "--num-experts-per-tok", "2",
                         "--inference-rope-scaling")
    assert code == 0, err
    d = json.loads(out)
    assert d["generation"] == "minimind3" and d["num_experts_per_tok"] == 2
    assert d["rms_norm_eps"] == 1e-6 and d["num_attention_heads_assumed"] is False
    assert d["rope_scaling"]["factor"] == 16  # upstream's YaRN switch
    code, _, err = run(capsys, "info", path, "--hidden-size", "64")
    assert code == 1
    assert_one_line_error(err, "hidden_size=64 contradicts the checkpoint")


def save_lora(path: Path, hidden: int, layers: int, ranks: dict[str, int], dtype: str = "float32"):
    """An upstream LoRA file written by hand: ``{module}.lora.A.weight`` [r, in], ``B`` [out, r]."""
    import torch

    rng = np.random.default_rng(0)
    state = {}
    for i in range(layers):
        for proj, r in ranks.items():
            name = f"model.layers.{i}.self_attn.{proj}.lora"
            state[f"{name}.A.weight"] = torch.from_numpy(rng.standard_normal((r, hidden), np.float32))
            state[f"{name}.B.weight"] = torch.from_numpy(rng.standard_normal((hidden, r), np.float32))
    state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@needs_torch
def test_info_reports_and_checks_the_lora(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")  # hidden 128 (8 heads x 16), 2 layers
    lora = save_lora(path.parent / "lora" / "lora_identity_128.pth", 128, 2,
                     {"q_proj": 4, "o_proj": 2}, dtype="bfloat16")
    code, out, err = run(capsys, "info", path, "--lora", lora, "--json")
    assert code == 0, err
    assert json.loads(out)["lora"] == {"path": str(lora), "rank": 4, "ranks": [2, 4],
                                       "modules": 4, "file_dtype": "bfloat16"}
    code, text, err = run(capsys, "info", path, "--lora", lora)
    assert code == 0, err
    row = next(line for line in text.splitlines() if line.startswith("lora "))
    assert str(lora) in row and "rank 2/4" in row and "4 modules" in row and "bfloat16" in row

    # upstream's --lora_weight NAME finds {save_dir}/lora/NAME_{hidden}.pth
    code, out, err = run(capsys, "info", "--save_dir", path.parent, "--hidden_size", "128",
                         "--lora_weight", "lora_identity", "--json")
    assert code == 0, err
    assert Path(json.loads(out)["lora"]["path"]) == lora
    code, out, _ = run(capsys, "info", path, "--json")
    assert json.loads(out)["lora"] is None

    # a LoRA trained for another hidden size is refused, as generate refuses it
    wrong = save_lora(path.parent / "lora" / "lora_other_128.pth", 64, 2, {"q_proj": 4})
    for argv in (["info", path, "--lora", wrong],
                 ["info", "--save_dir", path.parent, "--hidden_size", "128", "--lora_weight",
                  "lora_other"]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == ""
        assert_one_line_error(err, "does not fit", "q_proj")


@needs_torch
def test_upstream_flags_resolve_to_the_fixture(capsys, make_checkpoint, monkeypatch):
    path, _, _ = make_checkpoint("minimind2")
    root = path.parents[1]
    code, out, err = run(capsys, "info", "--save_dir", root / "out", "--weight", "full_sft",
                         "--hidden_size", "128", "--json")
    assert code == 0, err
    assert Path(json.loads(out)["path"]) == path
    monkeypatch.chdir(root)  # upstream's relative ./out and ./model
    code, out, err = run(capsys, "info", "--weight", "full_sft", "--hidden_size", "128", "--json")
    assert code == 0, err
    assert Path(json.loads(out)["path"]).resolve() == path.resolve()
    code, _, err = run(capsys, "info", "--weight", "full_sft", "--use_moe", "1")
    assert code == 1
    assert_one_line_error(err, "full_sft_512_moe.pth", "full_sft_768_moe.pth")


@needs_torch
def test_generate_json_greedy_with_the_chat_template(capsys, make_checkpoint):
    from minimind_core import load

    path, _, _ = make_checkpoint("minimind3")
    root = path.parents[1]
    tok = raw_tokenizer(root)
    code, out, err = run(capsys, "generate", "-m", path, "hello there", "--max-new-tokens", "6",
                         "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
                      "time_to_first_token", "tokens_per_second"}
    prompt_ids = tok.encode(chatml(("user", "hello there"))).ids
    assert d["prompt_tokens"] == len(prompt_ids)
    assert d["completion_tokens"] == len(d["token_ids"]) <= 6
    assert d["finish_reason"] in ("stop", "length")
    assert d["text"] == tok.decode([t for t in d["token_ids"] if t > 2])
    logits = load(path, backend="torch").logits(prompt_ids)
    assert d["token_ids"][0] == int(np.argmax(logits[-1]))  # greedy by default

    code, out, _ = run(capsys, "generate", "-m", path, "hello there", "--raw", "--max-new-tokens",
                       "3", "--json")
    assert code == 0 and json.loads(out)["prompt_tokens"] == len(tok.encode("hello there").ids)


@needs_torch
def test_generate_upstream_flags_equal_model_flag(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    out_dir = path.parent
    base = ["hi", "--max-new-tokens", "5", "--json"]
    a = run(capsys, "generate", "-m", path, *base)
    b = run(capsys, "generate", "--save_dir", out_dir, "--weight", "full_sft", "--hidden_size",
            "128", "--load_from", out_dir.parent / "model", *base)
    assert a[0] == b[0] == 0, (a[2], b[2])
    assert json.loads(a[1])["token_ids"] == json.loads(b[1])["token_ids"]


@needs_torch
def test_generate_sampling_flags_reach_the_sampler(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")

    def ids(*flags):
        code, out, err = run(capsys, "generate", "-m", path, "abc", "--max-new-tokens", "8",
                             "--json", *flags)
        assert code == 0, err
        return json.loads(out)

    greedy = ids()["token_ids"]
    assert ids("--temperature", "1", "--top-k", "1")["token_ids"] == greedy
    s1 = ids("--temperature", "1.5", "--seed", "1")["token_ids"]
    assert ids("--temperature", "1.5", "--seed", "1")["token_ids"] == s1
    others = [ids("--temperature", "1.5", "--seed", str(s))["token_ids"] for s in (2, 3)]
    assert any(o != s1 for o in others)
    text = ids("--max-new-tokens", "20")["text"]
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    d = ids("--max-new-tokens", "20", "--stop", stop)
    assert d["text"] == text[:text.index(stop)] and d["finish_reason"] == "stop"


@needs_torch
def test_generate_reads_stdin(capsys, make_checkpoint, monkeypatch):
    path, _, _ = make_checkpoint("minimind2")
    tok = raw_tokenizer(path.parents[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    code, out, err = run(capsys, "generate", "-m", path, "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(tok.encode(chatml(("user", "from stdin"))).ids)
    code, out, err = run(capsys, "generate", "-m", path, "--max-new-tokens", "2")
    assert code == 1  # stdin used up: empty prompt
    assert_one_line_error(err, "empty")


@needs_torch
def test_generate_streams_and_prints_stats(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    code, streamed, err = run(capsys, "generate", "-m", path, "hi", "--max-new-tokens", "5",
                              "--stream", "--temperature", "0")
    assert code == 0
    code, whole, _ = run(capsys, "generate", "-m", path, "hi", "--max-new-tokens", "5", "--no-stream", "-q")
    assert code == 0 and streamed == whole
    assert err.strip().startswith("[") and "tok/s" in err
    code, _, err = run(capsys, "generate", "-m", path, "hi", "--max-new-tokens", "2", "--show_speed", "0")
    assert code == 0 and err == ""


@needs_torch
def test_upstream_pretrain_weights_get_bos_and_no_template(capsys, make_checkpoint):
    import shutil

    path, _, _ = make_checkpoint("minimind2")
    shutil.copy(path, path.parent / "pretrain_128.pth")
    tok = raw_tokenizer(path.parents[1])
    code, out, err = run(capsys, "generate", "--save_dir", path.parent, "--weight", "pretrain",
                         "--hidden_size", "128", "hello", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(tok.encode("<|im_start|>hello").ids)
    assert tok.encode("<|im_start|>hello").ids[0] == 1  # bos, as upstream's eval_llm.py feeds it


@needs_torch
def test_chat_repl_on_a_real_model(capsys, make_checkpoint, monkeypatch):
    from minimind_core.engine import Engine

    path, _, _ = make_checkpoint("minimind2")
    seen = []
    original = Engine.stream_chat

    def spy(self, messages, *args, **kw):
        seen.append(([m["role"] for m in messages], kw.get("max_history")))
        return original(self, messages, *args, **kw)

    monkeypatch.setattr(Engine, "stream_chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\nclear\nthird\nexit\nnever\n"))
    code, out, err = run(capsys, "chat", "-m", path, "--max-new-tokens", "4", "--system", "S",
                         "--history", "5")
    assert code == 0, err
    assert seen == [(["system", "user"], 5), (["system", "user", "assistant", "user"], 5),
                    (["system", "user"], 5)]
    assert err.count("tok/s") == 3 and "(history cleared)" in err
    assert "Traceback" not in err

    seen.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    code, _, err = run(capsys, "chat", "-m", path, "--max-new-tokens", "2", "--historys", "4", "-q")
    assert code == 0 and [h for _, h in seen] == [2, 2] and "tok/s" not in err
    code, _, err = run(capsys, "chat", "-m", path, "--history", "1", "--historys", "2")
    assert code == 1
    assert_one_line_error(err, "--historys")


@needs_torch
def test_bench_on_a_real_model(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")
    code, out, err = run(capsys, "bench", "-m", path, "--prompt-tokens", "8", "--gen-tokens", "4",
                         "--batch", "2", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["prefill_tokens_per_second"] > 0 and r["decode_tokens_per_second"] > 0 for r in rows)
    code, out, _ = run(capsys, "bench", "-m", path, "--prompt-tokens", "8", "--gen-tokens", "3",
                       "--batch", "2")
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[2].startswith("| 1 | 8 |") and table[3].startswith("| 2 | 8 |")
    code, out, _ = run(capsys, "bench", "-m", path, "--prompt-tokens", "8", "--gen-tokens", "3",
                       "--batch", "1", "--quant-rows")
    assert code == 0
    weights = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert weights == ["float32", "int8 (group 32)", "int4 (group 32)"]


@needs_torch
def test_bench_leaves_the_engine_free(make_checkpoint):
    from minimind_core import load
    from minimind_core.cli import bench as bench_cmd

    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch")
    rows = bench_cmd.bench(engine, (1, 2), prompt_tokens=5, gen_tokens=3)
    assert [r["batch"] for r in rows] == [1, 2]
    # every token loop was closed: the same thread may generate again (no EngineBusyError)
    assert engine.generate("hi", max_new_tokens=2).completion_tokens >= 1


@needs_torch
def test_chat_stats_after_ctrl_c_count_the_real_prompt(capsys, make_checkpoint, monkeypatch):
    """Ctrl-C lands while the first piece of the reply is printed: the stats line still
    counts the prompt the model was given (ChatML rendered by hand, tokenized directly)."""
    from minimind_core.cli import chat as chat_cmd

    path, _, _ = make_checkpoint("minimind2")
    written = []

    class CtrlC(io.StringIO):
        def write(self, text):
            written.append(text)
            if len(written) == 1 and text:
                raise KeyboardInterrupt
            return super().write(text)

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\nexit\n"))
    monkeypatch.setattr(chat_cmd.sys, "stdout", CtrlC())
    code, _, err = run(capsys, "chat", "-m", path, "--max-new-tokens", "8",
                       "--system", "be brief")
    assert code == 0, err
    prompt = chatml(("system", "be brief"), ("user", "hello world"))
    n = len(raw_tokenizer(path.parents[1]).encode(prompt).ids)
    assert "(reply stopped)" in err and f"prompt {n} tokens]" in err


@needs_torch
def test_bad_seed_names_the_flag(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    for bad in ("-1", str(2**64), "x"):
        code, _, err = run(capsys, "generate", "-m", path, "hi", "--seed", bad)
        assert code == 2 and "argument --seed" in err and "Traceback" not in err
    code, out, err = run(capsys, "generate", "-m", path, "hi", "--seed", str(2**64 - 1),
                         "--temperature", "1", "--max-new-tokens", "2", "--json")
    assert code == 0, err


# ---- bad input: one line, non-zero exit, never a traceback -----------------------------------------

@needs_torch
@pytest.mark.parametrize("argv,code,fragment", [
    (["generate", "-m", "{missing}", "hi"], 1, "no such file"),
    (["generate", "-m", "{path}", "hi", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["generate", "-m", "{path}", "hi", "--backend", "nope"], 1, "unknown backend 'nope'"),
    (["generate", "-m", "{path}", "hi", "--temperature", "-1"], 1, "temperature must be >= 0"),
    (["generate", "-m", "{path}", "hi", "--max-new-tokens", "x"], 2, "invalid int value"),
    (["generate", "-m", "{path}", "hi", "--q-bits", "3", "--backend", "torch"], 1, "must be 8 or 4"),
    (["generate", "-m", "{path}", "hi", "--q-group-size", "32", "--backend", "torch"], 1,
     "needs --q-bits"),
    (["generate", "-m", "{path}", "hi", "--save_dir", "out"], 1, "not both"),
    (["generate", "-m", "{path}", "hi", "--lora", "{missing}"], 1, "no such file"),
    (["generate", "-m", "{path}", "hi", "--tokenizer", "{missing}"], 1, "does not exist"),
    (["generate", "-m", "{path}", "hi", "--device", "tpu"], 1, "unknown device"),
    (["generate", "-m", "{path}", "hi", "--dtype", "int3"], 1, "unknown dtype"),
    (["generate", "-m", "{garbage}", "hi"], 1, "garbage.pth: "),  # names the file
    (["chat", "-m", "{path}", "--chat-template-args", "{{bad"], 2, "not valid JSON"),
    (["info", "{missing}"], 1, "no such file"),
    (["bench", "-m", "{path}", "--gen-tokens", "1"], 1, "--gen-tokens"),
    (["convert", "--to", "onnx", "a", "b"], 2, "invalid choice"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_input_one_line(capsys, make_checkpoint, tmp_path, argv, code, fragment):
    path, _, _ = make_checkpoint("minimind2")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    subs = {"path": path, "missing": tmp_path / "missing.pth", "garbage": garbage}
    got, _, err = run(capsys, *[a.format(**subs) for a in argv])
    assert got == code
    assert_one_line_error(err, fragment)


@needs_torch
@pytest.mark.parametrize("kind", ["minimind2-moe", "minimind3-moe"])
@pytest.mark.parametrize("command,flags,fragments", [
    ("generate", ["--num-experts-per-tok", "5"], ("num_experts_per_tok", "1 to num_experts=4", "got 5")),
    ("generate", ["--num_experts_per_tok", "0"], ("num_experts_per_tok", "1 to num_experts=4", "got 0")),
    ("info", ["--num-experts-per-tok", "5"], ("num_experts_per_tok", "1 to num_experts=4", "got 5")),
    ("generate", ["--rms-norm-eps", "0"], ("rms_norm_eps must be a positive number",)),
    ("generate", ["--rope_theta", "-1"], ("rope_theta must be a positive number",)),
    ("generate", ["--max-position-embeddings", "0"], ("max_position_embeddings must be a positive",)),
    ("generate", ["--rope-scaling", '{"type": "linear"}'], ("rope_scaling must be", "linear")),
])
def test_bad_architecture_override_one_line(capsys, make_checkpoint, kind, command, flags, fragments):
    path, _, _ = make_checkpoint(kind)  # 4 routed experts
    argv = [command, "-m", path, *flags] + (["hi", "--max-new-tokens", "2"] if command == "generate"
                                            else [])
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    # not torch's "selected index k out of range" from inside the router
    assert "RuntimeError" not in err and "out of range" not in err
    assert_one_line_error(err, *fragments)


def test_no_prompt_on_a_terminal(capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    code, _, err = run(capsys, "generate")
    assert code == 1
    assert_one_line_error(err, "no prompt")


def test_interrupt_while_loading(capsys, monkeypatch):
    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "load_engine", boom)
    code, _, err = run(capsys, "generate", "hi")
    assert code == 130 and err.strip() == "minimind: interrupted"


def test_unexpected_error_is_one_line_unless_debug(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(common, "load_engine", boom)
    code, _, err = run(capsys, "bench")
    assert code == 1
    assert_one_line_error(err, "RuntimeError: kaput", "MINIMIND_DEBUG=1")
    monkeypatch.setenv("MINIMIND_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaput"):
        main(["bench"])


@needs_torch
def test_subprocess_generate_and_error(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    cmd = [sys.executable, "-m", "minimind_core", "generate", "-m", str(path), "hi",
           "--max-new-tokens", "3", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["completion_tokens"] <= 3
    proc = subprocess.run(cmd[:5] + [str(path) + ".missing", "hi"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "no such file")


# ---- the embedded demo model -----------------------------------------------------------------------

@needs_torch
@needs_demo
def test_demo_model_is_the_default(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert out.startswith("DEMO MODEL")
    code, out, err = run(capsys, "generate", "hello", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] >= 1
