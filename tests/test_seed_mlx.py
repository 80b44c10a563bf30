"""The MLX script's workflows (issue 20): an MLX folder renders the same prompt ids in stock
mlx_lm as in minimind-core (and as transformers on the source tokenizer, upstream's own call),
``minimind info`` on MLX folders, and the .pth cache that hashes a file once."""

from __future__ import annotations

import json
import shutil

import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
pytest.importorskip("torch")

from cli_helpers import run  # noqa: E402
from conftest import (  # noqa: E402
    build_tokenizer,
    hf_tokenizer,
    random_weights,
    save_pth,
    tiny_config,
)

from converters import to_mlx  # noqa: E402
from minimind_core import load, paths  # noqa: E402
from minimind_core.chat import ChatFormatter  # noqa: E402
from minimind_core.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.mlx

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "1+1="},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "再加1呢？"}],
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))


def _checkpoint(tmp_path, kind, tokenizer):
    """out/full_sft_128.pth of ``kind`` with ``tokenizer`` (a folder) as its model/."""
    config = tiny_config(kind, vocab_size=6400) if tokenizer.name.startswith("minimind") \
        else tiny_config(kind)
    root = tmp_path / kind
    shutil.copytree(tokenizer, root / "model")
    return save_pth(random_weights(config), root / "out" / "full_sft_128.pth"), config


def _mlx_lm_ids(folder, messages):
    """Stock mlx_lm's prompt ids for a conversation, as the MLX script computes them."""
    _, tok = mlx_lm.load(str(folder))
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


@pytest.mark.parametrize("kind, tokenizer", [("minimind2", "minimind2"),
                                             ("minimind3", "minimind3"),
                                             ("minimind3-moe", "minimind3")])
def test_mlx_folder_renders_the_same_ids_in_stock_mlx_lm(tmp_path, real_tokenizer, kind,
                                                          tokenizer):
    source = real_tokenizer(tokenizer)
    path, config = _checkpoint(tmp_path, kind, source)
    dst = to_mlx.convert(path, tmp_path / "mlx", progress=False,
                         overrides={"num_attention_heads": config.num_attention_heads})
    hf = hf_tokenizer(source)  # upstream's call: apply_chat_template with no extra switch
    ours = ChatFormatter(Tokenizer(dst))
    for messages in CONVERSATIONS:
        upstream = hf(hf.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True))["input_ids"]
        assert _mlx_lm_ids(dst, messages) == ours.encode(messages) == upstream
    engine = load(dst, backend="mlx", device="cpu")
    assert engine.chat_ids(CONVERSATIONS[0]) == _mlx_lm_ids(dst, CONVERSATIONS[0])


def test_the_unpinned_minimind2_template_differs_in_stock_mlx_lm(tmp_path, real_tokenizer):
    """The bug itself: stock mlx_lm sends enable_thinking=False for a vocabulary without <think>,
    and MiniMind2's own template then appends an empty think block upstream never renders."""
    source = real_tokenizer("minimind2")
    hf = hf_tokenizer(source)
    upstream = hf(hf.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                         add_generation_prompt=True))["input_ids"]
    folder = tmp_path / "plain-copy"  # upstream's model/ as is, without the converter's pin
    shutil.copytree(source, folder)
    stock = mlx_lm.tokenizer_utils.load(folder)
    with_block = list(stock.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True))
    empty_think = hf("<think>\n\n</think>\n\n")["input_ids"]
    assert with_block == upstream + empty_think


def test_tokenizer_without_template_gets_the_fallback_everywhere(tmp_path):
    plain = build_tokenizer(tmp_path / "tok" / "model", chat_template=None)
    path, config = _checkpoint(tmp_path, "minimind3", plain)
    dst = to_mlx.convert(path, tmp_path / "mlx", progress=False)
    # the MLX script's fallback format, written out by hand
    text = "System: 你是一个助手\n\nUser: 1+1=\n\nAssistant: 2\n\nUser: 再加1呢？\n\nAssistant: "
    expected = Tokenizer(plain).encode(text)
    assert _mlx_lm_ids(dst, CONVERSATIONS[1]) == expected
    assert ChatFormatter(Tokenizer(dst)).encode(CONVERSATIONS[1]) == expected
    with pytest.warns(UserWarning, match="no chat template"):
        assert ChatFormatter(Tokenizer(plain)).encode(CONVERSATIONS[1]) == expected


# ---- minimind info on MLX folders ---------------------------------------------------------------

def test_info_reads_a_quantized_mlx_folder(capsys, make_checkpoint, tmp_path):
    path, config, _ = make_checkpoint("minimind3")
    dst = to_mlx.convert(path, tmp_path / "q4", q_bits=4, q_group_size=32, progress=False)
    code, out, err = run(capsys, "info", dst, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["backend"] == "mlx" and d["quantization"]["bits"] == 4
    assert (d["hidden_size"], d["num_hidden_layers"], d["intermediate_size"]) == \
        (config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    code, text, _ = run(capsys, "info", "-m", dst)
    assert code == 0 and "4-bit (group size 32)" in text and "mlx backend" in text
    code, out, err = run(capsys, "info", path, "--backend", "torch", "--json")
    assert code == 0, err
    assert json.loads(out)["backend"] == "torch" and json.loads(out)["parameters"] == \
        config.num_parameters()


# ---- the .pth cache hashes a file once ----------------------------------------------------------

def test_pth_cache_hashes_the_file_once(make_checkpoint, monkeypatch):
    path, config, _ = make_checkpoint("minimind3")
    hashed = []
    original = paths.sha256_file
    monkeypatch.setattr(paths, "sha256_file", lambda p, *a: hashed.append(p) or original(p, *a))
    first = load(path, backend="mlx", device="cpu")
    second = load(path, backend="mlx", device="cpu")
    assert len(hashed) == 1 and first.info["mlx_cache"] == second.info["mlx_cache"]

    # rewritten in place (new content, new mtime): hashed again, a new entry
    weights = random_weights(config, seed=9)
    save_pth(weights, path)
    third = load(path, backend="mlx", device="cpu")
    assert len(hashed) == 2 and third.info["mlx_cache"] != first.info["mlx_cache"]
    ids = [1, 5, 7]
    assert (third.logits(ids) != first.logits(ids)).any()
