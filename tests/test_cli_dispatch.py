"""``minimind convert`` and ``minimind serve``: dispatch to the converters and the server, their
flags and help, and what happens when the serve extra is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, needs_torch, run

from minimind_core.cli import common

# ---- convert and serve dispatch --------------------------------------------------------------------

def fake_module(monkeypatch, name: str, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_convert_calls_the_converter(capsys, monkeypatch, tmp_path):
    calls = []
    fake_module(monkeypatch, "converters.to_mlx", convert=lambda src, dst, **kw: calls.append(
        ("mlx", src, dst, kw)) or Path(dst))
    fake_module(monkeypatch, "converters.to_hf", convert=lambda src, dst, **kw: calls.append(
        ("hf", src, dst, kw)))
    code, out, err = run(capsys, "convert", "--to", "mlx", "a.pth", tmp_path / "m", "--q-bits", "4",
                         "--q-group-size", "32", "--dtype", "float16", "--force",
                         "--num-experts-per-tok", "1")
    assert code == 0, err
    assert calls[-1] == ("mlx", "a.pth", str(tmp_path / "m"),
                         {"q_bits": 4, "q_group_size": 32, "dtype": "float16", "force": True,
                          "overrides": {"num_experts_per_tok": 1}})
    assert f"wrote {tmp_path / 'm'}" in out
    code, _, err = run(capsys, "convert", "--to", "hf", "a.pth", "b", "--lora", "l.pth",
                       "--tokenizer", "tok")
    assert code == 0, err
    assert calls[-1] == ("hf", "a.pth", "b", {"lora": "l.pth", "tokenizer": "tok", "force": False})
    code, _, err = run(capsys, "convert", "--to", "hf", "a.pth", "b", "--q-bits", "4")
    assert code == 2  # refused input
    assert_one_line_error(err, "--to mlx")


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("converters.to_hf") is None,
                    reason="converters.to_hf is not written yet")
def test_convert_to_hf_for_real(capsys, make_checkpoint, tmp_path):
    from minimind_core.checkpoint import load_checkpoint

    path, _, weights = make_checkpoint("minimind3")
    dst = tmp_path / "hf"
    code, _, err = run(capsys, "convert", "--to", "hf", path, dst)
    assert code == 0, err
    back = load_checkpoint(dst).weights
    assert all(np.array_equal(back[k], w) for k, w in weights.items())
    code, _, err = run(capsys, "convert", "--to", "hf", path, dst)
    assert code == 2 and "Traceback" not in err  # DST exists without --force: refused


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs the mlx extra")
def test_convert_to_mlx_and_generate_on_mlx(capsys, make_checkpoint, tmp_path):
    path, _, weights = make_checkpoint("minimind3")
    dst = tmp_path / "mlx"
    code, _, err = run(capsys, "convert", "--to", "mlx", path, dst, "--dtype", "float32")
    assert code == 0, err
    assert json.loads((dst / "config.json").read_text())["model_type"] == "qwen3"
    a = run(capsys, "generate", "-m", path, "hi", "--max-new-tokens", "4", "--json",
            "--backend", "torch")
    b = run(capsys, "generate", "-m", dst, "hi", "--max-new-tokens", "4", "--json",
            "--backend", "mlx")
    assert a[0] == b[0] == 0, (a[2], b[2])
    assert json.loads(a[1])["token_ids"] == json.loads(b[1])["token_ids"]


def test_serve_passes_model_flags_to_the_server(capsys, monkeypatch, make_checkpoint):
    seen = {}

    def configure_parser(parser):
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--model", default=None)  # the server defines some shared flags

    def fake_run(args, load_engine):  # the real server loads with common.load_engine(args)
        assert load_engine is common.load_engine
        seen.update(vars(args), location=common.model_location(args))

    fake_module(monkeypatch, "minimind_core.server", configure_parser=configure_parser,
                run=fake_run)
    path, _, _ = make_checkpoint("minimind2")
    code, _, err = run(capsys, "serve", "-m", path, "--port", "9", "--backend", "torch")
    assert code == 0, err
    assert seen["port"] == 9 and seen["backend"] == "torch"
    assert seen["location"] == (path, None, None)  # (model, lora, tokenizer)
    code, _, err = run(capsys, "serve", "--save_dir", path.parent, "--hidden_size", "128")
    assert code == 0, err
    assert seen["location"][0] == path  # upstream flags reach the server's loader
    code, _, err = run(capsys, "serve", "--model", path.with_suffix(".nope"))
    assert code == 1
    assert_one_line_error(err, "no such file")


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None, reason="needs the serve extra")
def test_serve_help_with_the_real_server(capsys):
    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0
    for flag in ("--port", "--api-key", "-m", "--model", "--save_dir", "--lora_weight"):
        assert flag in out
    assert out.count("\nmodel:\n") == 1  # the server's model flags and ours in one group


def test_serve_help_has_one_model_group(capsys, monkeypatch):
    def configure_parser(parser):
        group = parser.add_argument_group("model")  # as the real server does
        group.add_argument("-m", "--model", default=None)
        group.add_argument("--served-model-name", default=None)
        parser.add_argument_group("server").add_argument("--port", type=int, default=8000)

    fake_module(monkeypatch, "minimind_core.server", configure_parser=configure_parser,
                run=lambda args, load_engine: 0)
    code, out, _ = run(capsys, "serve", "--help")
    assert code == 0
    headings = [line for line in out.splitlines() if line and not line[0].isspace()
                and line.endswith(":")]
    assert headings.count("model:") == 1, headings
    model = out.split("\nmodel:\n")[1].split("\n\n")[0]
    for flag in ("--served-model-name", "--backend", "--merge-lora", "--q-bits", "--lora"):
        assert flag in model, flag


def test_convert_help_does_not_promise_upstream_paths(capsys):
    code, out, _ = run(capsys, "convert", "--help")
    assert code == 0 and "--hidden_size" in out
    assert "--save_dir" not in out and "{weight}" not in out  # convert takes SRC, not upstream paths
    code, out, _ = run(capsys, "info", "--help")
    assert code == 0 and "--save_dir" in out and "out/{weight}_{hidden}.pth" in out


def test_serve_without_the_server(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "minimind_core.server", None)  # import fails
    code, _, err = run(capsys, "serve")
    assert code == 1
    assert_one_line_error(err, "minimind-core[serve]")


def test_serve_passes_architecture_overrides(capsys, monkeypatch):
    seen = {}
    fake_module(monkeypatch, "minimind_core.server",
                configure_parser=lambda parser: parser.add_argument("--model", default=None),
                run=lambda args, load_engine: seen.update(vars(args)) or 0)
    code, _, err = run(capsys, "serve", "--num-experts-per-tok", "1", "--q-bits", "4")
    assert code == 0, err
    assert seen["num_experts_per_tok"] == 1 and seen["q_bits"] == 4
