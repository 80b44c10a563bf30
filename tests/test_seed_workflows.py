"""The seeds' workflows as their users wrote them (issue 20): upstream's eval_llm.py flags and
Python API lines, the MLX script's flags, batch mode, the demo's defaults and the README's
examples. Each test reproduces one "Why" bullet of the issue and checks the fixed behaviour
against an independent oracle (transformers, upstream's formulas, the demo's training corpus).
"""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ROOT, assert_one_line_error, needs_demo, needs_torch, run

from minimind_core import SamplingParams, load

sys.path.insert(0, str(ROOT / "examples"))
import demo_corpus as corpus  # noqa: E402

pytestmark = needs_torch


def _json(out: str) -> dict:
    return json.loads(out)


# ---- eval_llm.py's architecture flags alone name its default file ----------------------------

def test_hidden_size_alone_reads_upstreams_default_file(capsys, make_checkpoint, monkeypatch):
    path, _, _ = make_checkpoint("minimind2")
    root = path.parents[1]
    monkeypatch.chdir(root)  # upstream's layout: ./out/full_sft_128.pth, ./model/
    code, out, err = run(capsys, "generate", "--hidden_size", "128", "hi", "--max-new-tokens",
                         "4", "--json")
    assert code == 0, err
    assert "out/full_sft_128.pth" in err and "--save_dir out --weight full_sft" in err
    code, explicit, _ = run(capsys, "generate", "-m", path, "hi", "--max-new-tokens", "4",
                            "--json", "-q")
    assert _json(out)["token_ids"] == _json(explicit)["token_ids"]

    # absent: one line naming the file eval_llm.py would read, never the demo model
    code, _, err = run(capsys, "generate", "--hidden_size", "512", "hi")
    assert code == 1
    assert_one_line_error(err, "out/full_sft_512.pth", "--model PATH")


def test_use_moe_alone_reads_the_moe_file(capsys, make_checkpoint, monkeypatch):
    path, config, _ = make_checkpoint("minimind2-moe")
    monkeypatch.chdir(path.parents[1])
    code, out, err = run(capsys, "info", "--use_moe", "1", "--hidden_size", "128", "--json")
    assert code == 0, err
    d = _json(out)
    assert d["path"].endswith("out/full_sft_128_moe.pth") and d["moe"] is True
    assert d["num_experts"] == config.num_experts


def test_chat_auto_asks_eval_llms_preset_questions_each_on_its_own(capsys, make_checkpoint,
                                                                   monkeypatch):
    from minimind_core.engine import Engine

    path, _, _ = make_checkpoint("minimind2")
    seen = []
    original = Engine.stream_chat

    def spy(self, messages, *args, **kw):
        seen.append((messages[-1]["content"], kw.get("max_history")))
        return original(self, messages, *args, **kw)

    monkeypatch.setattr(Engine, "stream_chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # --auto never reads input
    code, out, err = run(capsys, "chat", "-m", path, "--auto", "--max-new-tokens", "2", "-q")
    assert code == 0, err
    # eval_llm.py's prompts list, copied by hand from upstream's script
    first, last = "你有什么特长？", "推荐一些中国的美食"
    assert len(seen) == 8 and seen[0][0] == first and seen[-1][0] == last
    assert all(h == 0 for _, h in seen)  # upstream's default --historys 0
    assert out.count("💬: ") == 8 and out.startswith(f"💬: {first}\n")


# ---- the seed's Python API lines ----------------------------------------------------------------

def test_seed_load_kwargs_are_accepted_with_their_meaning(make_checkpoint):
    path, config, _ = make_checkpoint("minimind2")
    base = load(path, backend="torch")
    ids = [1, 5, 77, 200, 31]
    with pytest.warns(UserWarning, match="flash_attn=False changes nothing"):
        same = load(path, backend="torch", flash_attn=False)
    # upstream's flash_attn=False is its manual softmax attention: the same numbers
    assert np.abs(same.logits(ids) - base.logits(ids)).max() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every load
        load(path, backend="torch", flash_attn=False, use_moe=False, hidden_size=128,
             num_hidden_layers=2)
    with pytest.raises(ValueError, match="use_moe=True.*dense"):
        load(path, backend="torch", use_moe=True)
    moe_path, _, _ = make_checkpoint("minimind2-moe")
    assert load(moe_path, backend="torch", use_moe=True).config.use_moe


def _transformers_sampling_defaults() -> dict:
    transformers = pytest.importorskip("transformers")
    config = transformers.GenerationConfig
    if hasattr(config, "_get_default_generation_params"):  # transformers 5
        return config._get_default_generation_params()
    return vars(config())  # transformers 4 keeps them on the instance


def test_do_sample_follows_transformers():
    oracle = _transformers_sampling_defaults()
    params = SamplingParams.from_kwargs(do_sample=True)
    assert (params.temperature, params.top_k, params.top_p) == \
        (oracle["temperature"], oracle["top_k"], oracle["top_p"])
    # the seed's line: do_sample=True with its temperature and top_p
    assert SamplingParams.from_kwargs(do_sample=True, temperature=0.85, top_p=0.85) == \
        SamplingParams(temperature=0.85, top_p=0.85, top_k=oracle["top_k"])
    # do_sample=False is greedy whatever the temperature (transformers ignores it then)
    assert SamplingParams.from_kwargs(do_sample=False, temperature=0.85).greedy
    assert SamplingParams.from_kwargs(use_cache=True) == SamplingParams()


def test_generate_with_do_sample_true(make_checkpoint):
    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch")
    a = engine.generate([1, 5, 77], max_new_tokens=6, do_sample=True, seed=3)
    b = engine.generate([1, 5, 77], max_new_tokens=6, temperature=1.0, top_k=50, seed=3)
    assert a.token_ids == b.token_ids


def test_generate_batch_of_message_lists(make_checkpoint):
    from conftest import hf_tokenizer

    path, _, _ = make_checkpoint("minimind2")
    engine = load(path, backend="torch")
    convs = [[{"role": "user", "content": "你好"}],
             [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]]
    results = engine.generate_batch([*convs, "raw text"], max_new_tokens=5)
    hf = hf_tokenizer(path.parents[1] / "model")  # the seed's apply_chat_template
    for conv, r in zip(convs, results):
        text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert r.prompt_tokens == len(hf(text)["input_ids"])
        assert r.token_ids == engine.chat(conv, max_new_tokens=5).token_ids
    assert results[2].prompt_tokens == len(hf("raw text")["input_ids"])


# ---- batch mode and -p/--prompt on the demo model (oracle: its training corpus) ----------------

@needs_demo
def test_generate_batch_file_prints_one_result_a_line(capsys, tmp_path):
    lines = ["你是谁", "", "12+34",
             json.dumps([{"role": "user", "content": "Who are you?"}]),
             json.dumps({"prompt": "你好"}, ensure_ascii=False)]
    batch = tmp_path / "prompts.txt"
    batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "generate", "--batch-file", batch, "--batch-size", "3")
    assert code == 0, err
    assert out.splitlines() == [corpus.IDENTITY_ZH, corpus.arithmetic_answer("+", 12, 34),
                                corpus.IDENTITY_EN, corpus.GREET_ZH_REPLY]
    assert "4 prompts" in err
    code, out, _ = run(capsys, "generate", "--batch-file", batch, "--json", "-q")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4, 5]
    assert all(r["finish_reason"] == "stop" for r in records)

    batch.write_text('[{"role": "nobody", "content": "x"}]\n', encoding="utf-8")
    code, _, err = run(capsys, "generate", "--batch-file", batch)
    assert code == 1
    assert_one_line_error(err, "line 1", "unknown role")


@needs_demo
def test_prompt_flag_as_the_mlx_script_has_it(capsys):
    code, out, err = run(capsys, "generate", "--prompt", "你是谁", "-q")
    assert code == 0, err
    assert out.strip() == corpus.IDENTITY_ZH
    code, short, _ = run(capsys, "generate", "-p", "你是谁", "--system-prompt", "S", "-q")
    assert code == 0 and short.strip()
    code, _, err = run(capsys, "generate", "-p", "a", "b")
    assert code == 1
    assert_one_line_error(err, "-p/--prompt")


# ---- the demo model's defaults and the README's examples --------------------------------------

@needs_demo
def test_demo_chat_answers_the_third_turn_with_default_history(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n12+34\n你是谁\n"))
    code, out, err = run(capsys, "chat", "-q")
    assert code == 0, err
    assert out.splitlines() == [corpus.GREET_ZH_REPLY, corpus.arithmetic_answer("+", 12, 34),
                                corpus.IDENTITY_ZH]


def _readme_line(fragment: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return next(line.split("#")[0].strip() for line in text.splitlines()
                if line.startswith("minimind ") or line.startswith("echo ")
                if fragment in line)


@needs_demo
def test_readme_raw_example_is_one_the_demo_answers(tmp_path):
    line = _readme_line("--raw --json")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "MINIMIND_CACHE": str(tmp_path),
           "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    d = json.loads(done.stdout)
    assert d["text"] == corpus.arithmetic_answer("+", 12, 34) and d["finish_reason"] == "stop"


def test_fallback_formatter_says_so_once(capsys, tmp_path, make_checkpoint, monkeypatch):
    from conftest import build_tokenizer

    path, _, _ = make_checkpoint("minimind2")
    plain = build_tokenizer(tmp_path / "plain", chat_template=None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n"))
    code, _, err = run(capsys, "chat", "-m", path, "--tokenizer", plain, "--max-new-tokens", "2",
                       "-q")
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("minimind: warning:")]
    assert len(warned) == 1 and "no chat template" in warned[0] and "System: ..." in warned[0]


# ---- info and the banners say what is loaded ---------------------------------------------------

def test_info_shows_the_yarn_factor_and_original_context(capsys, make_checkpoint):
    path, _, _ = make_checkpoint("minimind3")
    code, out, err = run(capsys, "info", path, "--inference-rope-scaling", "--json")
    assert code == 0, err
    scaling = json.loads(out)["rope_scaling"]
    # FORMATS.md: upstream's current switch is factor 16 over 2048 original positions
    assert (scaling["factor"], scaling["original_max_position_embeddings"]) == (16, 2048)
    code, text, _ = run(capsys, "info", path, "--inference-rope-scaling")
    assert "YaRN on: factor 16 over 2048 original positions" in text
    code, text, _ = run(capsys, "info", path)
    assert "YaRN off" in text


def _lora_file(path, config, rank=2):
    import torch

    out = path.parent / "lora" / f"lora_identity_{config.hidden_size}.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    state = {}
    for i in range(config.num_hidden_layers):
        for name, (dout, din) in (("q_proj", (q, h)), ("o_proj", (h, q))):
            if dout == din:
                state[f"model.layers.{i}.self_attn.{name}.lora.A.weight"] = torch.randn(rank, din)
                state[f"model.layers.{i}.self_attn.{name}.lora.B.weight"] = torch.randn(dout, rank)
    torch.save(state, out)
    return out


def test_chat_and_serve_banners_name_the_lora(capsys, make_checkpoint, monkeypatch):
    from minimind_core.cli import chat as chat_cli
    from minimind_core.cli import common
    from minimind_core.cli.entry import build_parser

    path, config, _ = make_checkpoint("minimind2")
    lora = _lora_file(path, config)
    engine = load(path, backend="torch", lora=lora)
    text = chat_cli.banner(engine, chat_cli.ChatSession())
    assert f"LoRA {lora.name}" in text

    pytest.importorskip("fastapi")
    server_run = importlib.import_module("minimind_core.server.run")  # the package's run() shadows it

    served = {}
    monkeypatch.setattr(server_run, "serve", lambda app, *a, **k: served.setdefault("app", app))
    args = build_parser(["serve"]).parse_args(["serve", "-m", str(path), "--lora", str(lora)])
    assert server_run.run(args, common.load_engine) == 0
    assert f"LoRA {lora.name}" in capsys.readouterr().err and "app" in served


@needs_demo
def test_serve_defaults_to_greedy_for_the_demo(monkeypatch):
    pytest.importorskip("fastapi")
    from minimind_core.cli import common
    from minimind_core.cli.entry import build_parser
    server_run = importlib.import_module("minimind_core.server.run")  # the package's run() shadows it

    seen = []
    monkeypatch.setattr(server_run, "serve", lambda *a, **k: None)
    monkeypatch.setattr(server_run, "create_app",
                        lambda engine, **kw: seen.append(kw["defaults"]) or object())
    for argv, temperature in ((["serve"], 0.0), (["serve", "--temperature", "0.5"], 0.5)):
        server_run.run(build_parser(argv).parse_args(argv), common.load_engine)
        assert seen[-1].temperature == temperature


# ---- the README's "Coming from upstream" table is true --------------------------------------

def _migration_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Coming from upstream MiniMind / the MLX script", 1)[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    rows = table[2:]  # after the header and the |---| line
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_readme_migration_table_commands_parse_and_tests_exist():
    import re
    import shlex

    from minimind_core.cli.entry import build_parser

    rows = _migration_rows()
    assert len(rows) >= 25
    for _, here, checked in rows:
        for command in re.findall(r"`(minimind [^`]+)`", here):
            argv = shlex.split(command)[1:]
            try:
                build_parser(argv).parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"README command does not parse ({e.code}): {command}")
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", checked)
        assert named, checked
        for file, name in named:
            assert f"def {name}(" in (ROOT / file).read_text(encoding="utf-8"), (file, name)
