"""Tokenizer loading, encode/decode parity with transformers, and tokenizer discovery.

Upstream's real MiniMind tokenizers come from conftest's ``real_tokenizer`` fixture (the test
skips where they are absent); transformers is the independent oracle here and only here.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
from conftest import hf_tokenizer

from minimind_core.tokenizer import Tokenizer, TokenizerNotFoundError, find_tokenizer

NAMES = ("minimind2", "minimind3")

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "a\n\nb\tc\r\nd",
    "你好，世界！今天天气怎么样？",
    "混合 mixed 文本 with 数字 12345 and 标点。",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|endoftext|>text after eot",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
    "ﬁ ligature, Ǆ, café, naïve, Ω",
]


@pytest.fixture(params=NAMES)
def real(real_tokenizer, request) -> tuple[Tokenizer, object]:
    path = real_tokenizer(request.param)
    return Tokenizer(path), hf_tokenizer(path)


# -- parity with transformers --------------------------------------------------------------


def test_encode_matches_transformers(real):
    tok, hf = real
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"], text


def test_special_tokens_in_text_encode_to_their_ids(real):
    tok, _ = real
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|endoftext|>") == [0]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 3


def test_decode_matches_transformers(real):
    tok, hf = real
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), (text, skip)
    assert tok.decode(tok.encode("你好 world")) == "你好 world"
    assert tok.decode(tok.encode("<|im_start|>x<|im_end|>")) == "x"
    assert tok.decode(tok.encode("<|im_start|>x<|im_end|>"), skip_special_tokens=False) == (
        "<|im_start|>x<|im_end|>")


def test_decode_arbitrary_ids_matches_transformers(real):
    # Random ids split UTF-8 sequences and mix special tokens: the byte-level edge cases.
    tok, hf = real
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), ids
    assert tok.decode(5, skip_special_tokens=False) == hf.decode(5)  # a bare int
    assert tok.decode(5) == hf.decode(5, skip_special_tokens=True)


def test_attributes_match_transformers(real_tokenizer, real):
    tok, hf = real
    assert tok.vocab_size == len(tok) == len(hf) == 6400
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.stop_token_ids == frozenset({0, 2})
    assert tok.special_token_ids >= frozenset(hf.all_special_ids)
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.chat_template == hf.chat_template
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("no-such-token") is None
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(10**6) is None
    assert tok.path == real_tokenizer(tok.path.name)


def test_minimind3_think_tokens_are_not_special(real_tokenizer):
    path = real_tokenizer("minimind3")
    tok = Tokenizer(path)
    think = tok.token_to_id("<think>")
    assert think is not None and think not in tok.special_token_ids
    assert tok.decode(tok.encode("<think>x</think>")) == "<think>x</think>"


# -- tokenizer_config.json handling --------------------------------------------------------


def test_config_special_tokens_are_registered_like_transformers(real_tokenizer, tmp_path):
    # transformers adds special tokens named in the config that are not yet added tokens:
    # <mask> and <new> are new ids; a plain vocab entry named as a special token becomes
    # special (split out when encoding, skipped when decoding). <think> is already an added,
    # non-special token in tokenizer.json and keeps its flags there, so it is not skipped.
    base = Tokenizer(real_tokenizer("minimind3"))
    word = next(t for i in range(300, len(base))
                if (t := base.id_to_token(i)).isascii() and t.isalpha() and len(t) >= 5)
    folder = real_tokenizer.copy(tmp_path / "t", additional_special_tokens=["<think>", "<new>"],
                         mask_token="<mask>", sep_token=word)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert len(tok) == len(hf) == 6402
    text = f"<think>why</think> <mask> x{word}y <new>"
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids != base.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids,
                                                                      skip_special_tokens=skip)
    assert tok.decode(ids).startswith("<think>why</think>")
    assert "<mask>" not in tok.decode(ids) and word not in tok.decode(ids)
    assert tok.special_tokens_map == hf.special_tokens_map


def test_config_added_tokens_missing_from_tokenizer_json(real_tokenizer, tmp_path):
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    src = json.loads((real_tokenizer("minimind2") / "tokenizer_config.json").read_text("utf-8"))
    decoder = {**src["added_tokens_decoder"],
               "6400": {"content": "<extra>", "special": False, **flags},
               "6401": {"content": "<sp>", "special": True, **flags}}
    folder = real_tokenizer.copy(tmp_path / "t", "minimind2", added_tokens_decoder=decoder)
    tok, hf = Tokenizer(folder), hf_tokenizer(folder)
    assert len(tok) == len(hf) == 6402
    ids = tok.encode("a<extra>b<sp>c")
    assert ids == hf("a<extra>b<sp>c")["input_ids"] and 6400 in ids and 6401 in ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a<extra>bc"


def test_bos_eos_come_from_tokenizer_json_like_transformers(real_tokenizer, tmp_path):
    # transformers 5 ignores tokenizer_config's add_bos_token/add_eos_token when tokenizer.json
    # exists; the post-processor in tokenizer.json decides. Both are checked against it.
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    flags = real_tokenizer.copy(tmp_path / "flags", "minimind2", add_bos_token=True, add_eos_token=True)
    assert Tokenizer(flags).encode("hi 世界") == hf_tokenizer(flags)("hi 世界")["input_ids"]
    assert Tokenizer(flags).encode("hi")[0] != 1

    post = real_tokenizer.copy(tmp_path / "post", "minimind2")
    backend = Backend.from_file(str(post / "tokenizer.json"))
    backend.post_processor = TemplateProcessing(
        single="<|im_start|> $A <|im_end|>", special_tokens=[("<|im_start|>", 1),
                                                             ("<|im_end|>", 2)])
    backend.save(str(post / "tokenizer.json"))
    ids = Tokenizer(post).encode("hi 世界")
    assert ids == hf_tokenizer(post)("hi 世界")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2


def test_special_tokens_given_as_dicts(real_tokenizer, tmp_path):
    eos = {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": True, "__type": "AddedToken"}
    folder = real_tokenizer.copy(tmp_path / "t", "minimind2", eos_token=eos)
    tok = Tokenizer(folder)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.encode("a<|im_end|>") == hf_tokenizer(folder)("a<|im_end|>")["input_ids"]


def test_tokenizer_json_only(real_tokenizer, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copyfile(real_tokenizer("minimind2") / "tokenizer.json", folder / "tokenizer.json")
    tok = Tokenizer(folder)
    assert tok.chat_template is None and tok.eos_token is None and tok.eos_token_id is None
    assert tok.stop_token_ids == frozenset({0, 2})  # <|im_end|>, <|endoftext|> by name
    assert tok.encode("hi there") == Tokenizer(real_tokenizer("minimind2")).encode("hi there")


def test_chat_template_sources(real_tokenizer, tmp_path):
    # transformers 5 saves the template as chat_template.jinja; it wins over the config.
    folder = real_tokenizer.copy(tmp_path / "jinja", "minimind2")
    (folder / "chat_template.jinja").write_text("{{ 'from file' }}", encoding="utf-8")
    assert Tokenizer(folder).chat_template == "{{ 'from file' }}"
    # A list of named templates: "default" is used, "tool_use" when tools are given.
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    tok = Tokenizer(real_tokenizer.copy(tmp_path / "named", "minimind2", chat_template=named))
    assert tok.chat_template == "D"
    assert tok.get_chat_template(tools=[{"name": "f"}]) == "T"
    tok = Tokenizer(real_tokenizer.copy(tmp_path / "dict", "minimind2",
                                chat_template={"a": "A", "b": "B"}))
    with pytest.raises(ValueError, match="none named 'default'"):
        _ = tok.chat_template
    assert Tokenizer(real_tokenizer.copy(tmp_path / "none", chat_template=None)).chat_template is None


# -- errors --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_folder(missing)


def test_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_folder(tmp_path)
    msg = str(err.value)
    assert "tokenizer.json" in msg and str(tmp_path) in msg and "slow" in msg


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_config(real_tokenizer, tmp_path):
    folder = real_tokenizer.copy(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(folder)


def test_encode_rejects_non_strings(real_tokenizer):
    tok = Tokenizer(real_tokenizer("minimind2"))
    with pytest.raises(TypeError):
        tok.encode(["a", "b"])  # type: ignore[arg-type]


# -- discovery -----------------------------------------------------------------------------


def test_find_in_weights_folder(real_tokenizer, tmp_path):
    # transformers-format checkpoint: config.json, weights and tokenizer in one folder.
    folder = real_tokenizer.copy(tmp_path / "MiniMind2", "minimind2")
    (folder / "model.safetensors").write_bytes(b"")
    assert find_tokenizer(folder).path == folder
    assert find_tokenizer(folder / "model.safetensors").path == folder


def test_find_upstream_model_folder(real_tokenizer, tmp_path):
    model = real_tokenizer.copy(tmp_path / "X" / "model", "minimind3")
    weights = tmp_path / "X" / "out" / "full_sft_512.pth"
    lora = tmp_path / "X" / "out" / "lora" / "lora_identity_512.pth"
    lora.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    lora.write_bytes(b"")
    assert find_tokenizer(weights).path == model
    assert find_tokenizer(lora).path == model
    assert find_tokenizer(str(weights)).path == model


def test_weights_folder_beats_model_folder(real_tokenizer, tmp_path):
    real_tokenizer.copy(tmp_path / "X" / "model", "minimind3")
    near = real_tokenizer.copy(tmp_path / "X" / "out", "minimind2")
    (near / "w.pth").write_bytes(b"")
    assert find_tokenizer(near / "w.pth").path == near


def test_explicit_tokenizer_wins(real_tokenizer, tmp_path):
    weights = real_tokenizer.copy(tmp_path / "ckpt", "minimind2")
    other = real_tokenizer.copy(tmp_path / "other", "minimind3")
    assert find_tokenizer(weights, tokenizer=other).path == other
    assert find_tokenizer(weights, tokenizer=str(other / "tokenizer.json")).path == other
    assert find_tokenizer(None, tokenizer=other).path == other
    tok = Tokenizer(other)
    assert find_tokenizer(weights, tokenizer=tok) is tok


def test_wrong_explicit_tokenizer_does_not_fall_back(real_tokenizer, tmp_path):
    weights = real_tokenizer.copy(tmp_path / "ckpt", "minimind2")
    missing = tmp_path / "typo"
    with pytest.raises(TokenizerNotFoundError, match="typo"):
        find_tokenizer(weights, tokenizer=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerNotFoundError, match="empty.*tokenizer.json"):
        find_tokenizer(weights, tokenizer=empty)
    with pytest.raises(TokenizerNotFoundError, match="tokenizer_config.json"):
        find_tokenizer(weights, tokenizer=weights / "tokenizer_config.json")


def test_not_found_lists_every_path_tried(tmp_path):
    weights = tmp_path / "X" / "out" / "lora" / "l.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    with pytest.raises(TokenizerNotFoundError) as err:
        find_tokenizer(weights)
    msg = str(err.value)
    base = weights.parent.resolve()
    for tried in (base, base / "model", base.parent / "model", base.parent.parent / "model"):
        assert str(tried / "tokenizer.json") in msg
    assert str(base.parents[2] / "model") not in msg  # at most three levels up
    assert "--tokenizer" in msg and "tokenizer=" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_nothing_to_search():
    with pytest.raises(TokenizerNotFoundError, match="--tokenizer"):
        find_tokenizer(None)


def test_library_does_not_import_transformers():
    # Startup budget: transformers takes seconds to import; the core must not pull it in.
    code = ("import sys, minimind_core.tokenizer, minimind_core.chat; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
