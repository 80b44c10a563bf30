"""Issue 15, readers: lying files get one ValueError/OSError subclass naming the file and what is
wrong, never a TypeError, RecursionError, ZeroDivisionError, a 576 GB allocation or garbage.

Oracles: the safetensors library (every malformed header below is one it refuses too, and the
fuzz test holds our reader to its verdict), the issue's own list of faults, and hand-made files.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from conftest import build_tokenizer, random_weights, save_pth, tiny_config  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converters import to_hf  # noqa: E402
from minimind_core import load  # noqa: E402
from minimind_core.chat import ChatFormatter  # noqa: E402
from minimind_core.checkpoint import CheckpointError, load_checkpoint, read_safetensors  # noqa: E402
from minimind_core.config import MAX_CONTEXT, ModelConfig  # noqa: E402
from minimind_core.lora import LoraError, read_lora  # noqa: E402
from minimind_core.tokenizer import Tokenizer, TokenizerNotFoundError  # noqa: E402

pytestmark = pytest.mark.torch
FUZZ = settings(max_examples=60, deadline=timedelta(seconds=10), database=None,
                suppress_health_check=[HealthCheck.too_slow])


def st_file(path: Path, header, data: bytes = b"", raw: bytes | None = None) -> Path:
    """A safetensors file with exactly this header (any JSON value) and data."""
    head = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def stock_refuses(path: Path) -> bool:
    """The oracle: does the safetensors library itself refuse the file?"""
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception:  # SafetensorError, or a Rust panic surfaced as an exception
        return True
    return False


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


def variant(**entries):
    header = json.loads(json.dumps(GOOD))
    for key, value in entries.items():
        header[key] = value
    return header


@pytest.mark.parametrize("header, data, raw, message", [
    (variant(a={"dtype": "F32", "shape": [2, 2], "data_offsets": [-8, 8]}), 24, None,
     "tensor 'a': data_offsets [-8, 8] are not [start, end]"),
    (variant(b={"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}), 24, None,
     "tensor 'b' starts at byte 8 and overlaps the tensor before it (expected 16)"),
    (variant(b={"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}), 24, None,
     "file is truncated (the tensors need 32 bytes of data, it holds 24)"),
    (variant(a={"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}), 24, None,
     "tensor 'a': data_offsets span 16 bytes, but F32 x [3, 2] needs 24"),
    (variant(b={"dtype": "F32", "shape": [2], "data_offsets": [20, 28]}), 28, None,
     "tensor 'b' starts at byte 20 and leaves a gap before it (expected 16)"),
    (GOOD, 30, None, "6 bytes after the last tensor; the file is corrupt"),
    ([1, 2], 0, None, "corrupt safetensors header (it must be a JSON object)"),
    (None, 0, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "corrupt safetensors header (JSON nested too deeply)"),
    (variant(a=5), 24, None, "tensor 'a': its header entry is not a JSON object"),
    (variant(a={"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}), 24, None,
     "tensor 'a': shape [True, 4] is not a list of sizes"),
    (variant(a={"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}), 24, None,
     "tensor 'a': unknown dtype 'Q4'"),
    (variant(__metadata__={"format": 5}), 24, None,
     "__metadata__ must map names to strings"),
    (None, 24, b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
               b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}',
     "the name 'a' appears twice"),
])
def test_malformed_safetensors_headers(tmp_path, header, data, raw, message):
    path = st_file(tmp_path / "bad.safetensors", header, bytes(data), raw)
    assert stock_refuses(path)  # the safetensors library refuses each of these too
    with pytest.raises(CheckpointError) as e:
        read_safetensors(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_header_lengths_that_lie(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 200000000 is above the format's"):
        read_safetensors(huge)
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", 64) + b"{}")
    with pytest.raises(CheckpointError, match="bad header length"):
        read_safetensors(past)
    assert stock_refuses(huge) and stock_refuses(past)


def test_what_the_stock_writer_writes_reads_back(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 4), np.float16),
              "i": np.array([1, -2], np.int64)}
    save_file(arrays, tmp_path / "ok.safetensors", metadata={"format": "np"})
    back = read_safetensors(tmp_path / "ok.safetensors")
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)


# --- config.json -----------------------------------------------------------------------------------

def beside(path: Path, data) -> Path:
    file = path.parent / "config.json"
    file.write_text(json.dumps(data), encoding="utf-8")  # json writes NaN as NaN, as Python reads
    return file


@pytest.mark.parametrize("kind, data, message", [
    ("minimind2", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ("minimind2", {"rms_norm_eps": math.nan}, "rms_norm_eps must be a positive number (and finite), got nan"),
    ("minimind3", {"rope_theta": math.inf}, "rope_theta must be a positive number above 1"),
    ("minimind2", {"rope_scaling": {"type": "yarn", "factor": 0}},
     "rope_scaling factor must be a positive number, got 0"),
    ("minimind2", {"rope_scaling": {"rope_type": "yarn", "factor": -4}},
     "rope_scaling factor must be a positive number, got -4"),
    ("minimind2", {"max_position_embeddings": 10**12},
     f"max_position_embeddings=1000000000000 is above the {MAX_CONTEXT} positions"),
    ("minimind2", {"max_position_embeddings": 1e12}, "max_position_embeddings must be a positive integer"),
    ("minimind2", [1, 2], "must hold a JSON object ({...}), not a list"),
    ("minimind2", {"use_moe": "no"}, "use_moe must be true or false, got 'no'"),
    ("minimind3-moe", {"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
    ("minimind3-moe", {"num_experts_per_tok": 9}, "num_experts_per_tok must be an integer from 1 to num_experts=4"),
    # beyond the list
    ("minimind2", {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 0}},
     "original_max_position_embeddings must be an integer from 1 to"),
    ("minimind2", {"rope_theta": "1e6"}, "rope_theta must be a positive number above 1"),
    ("minimind2", {"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive integer, got 2.0"),
    ("minimind2", {"eos_token_id": 10**6}, "eos_token_id=1000000 is outside the vocabulary"),
])
def test_config_values_typed_and_in_range(make_checkpoint, kind, data, message):
    path, _, _ = make_checkpoint(kind)
    file = beside(path, data)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert message in str(e.value), str(e.value)
    if "num_experts=4" not in message and "outside" not in message:  # (combinations, checked
        # once the weights are read, are named by the checkpoint)
        assert str(e.value).startswith(f"{file}: ")


@pytest.mark.parametrize("kind, key, value, weights", [
    ("minimind2", "num_hidden_layers", 8, 2),
    ("minimind2", "hidden_size", 512, 128),
    ("minimind3", "num_attention_heads", 4, 8),
    ("minimind2", "num_key_value_heads", 4, 2),
    ("minimind3", "vocab_size", 6400, 512),
    ("minimind3-moe", "num_experts", 8, 4),
    ("minimind2-moe", "n_shared_experts", 2, 1),
    ("minimind2", "intermediate_size", 1408, 192),
])
def test_config_contradicting_the_weights_names_the_key(make_checkpoint, kind, key, value, weights):
    path, _, _ = make_checkpoint(kind)
    file = beside(path, {"model_type": "minimind", "use_moe": "moe" in kind, key: value})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"{path}: its {file} says {key}={value} but the weights give "
                            f"{key}={weights}; the config belongs to another model: fix or remove it")
    # upstream's own dense config keeps MoE defaults (4 experts, 1 shared): no contradiction
    beside(path, {"model_type": "minimind", "use_moe": False, "num_experts": 4,
                  "n_shared_experts": 1, "intermediate_size": None})
    if "moe" not in kind:
        assert load_checkpoint(path).config.num_experts == 0


def test_huge_context_never_allocates(make_checkpoint):
    """``max_position_embeddings: 1e12`` tried to allocate 576 GB; it is refused up front."""
    path, _, _ = make_checkpoint("minimind3")
    with pytest.raises(ValueError, match="max_position_embeddings=1000000000000 is above"):
        load(path, backend="torch", max_position_embeddings=10**12)
    assert ModelConfig(max_position_embeddings=MAX_CONTEXT).max_position_embeddings == MAX_CONTEXT


def test_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        load_checkpoint(folder)


# --- non-finite weights and LoRA values ------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_named(make_checkpoint, bad):
    path, config, weights = make_checkpoint("minimind2")
    weights["model.layers.1.mlp.up_proj.weight"][5, 7] = bad
    save_pth(weights, path)
    with pytest.raises(CheckpointError) as e:
        load(path, backend="torch")
    assert str(e.value) == (f"{path}: tensor model.layers.1.mlp.up_proj.weight holds 1 "
                            f"NaN/infinite value(s); the file is corrupt or the training "
                            f"diverged: use another checkpoint")


def test_integer_weights_are_refused(make_checkpoint):
    path, _, weights = make_checkpoint("minimind3")
    weights["model.norm.weight"] = np.ones(128, np.int64)
    save_pth(weights, path)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) that are not floating point, e\.g\. "
                                              r"model\.norm\.weight \(int64\)"):
        load_checkpoint(path)


def test_non_finite_bf16_safetensors_and_lora(make_checkpoint, tmp_path):
    path, config, weights = make_checkpoint("minimind3")
    state = {k: torch.from_numpy(v.copy()).bfloat16() for k, v in weights.items()}
    state["model.norm.weight"][3] = float("inf")
    from safetensors.torch import save_file as save_torch

    save_torch(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="tensor model.norm.weight holds 1 NaN/infinite"):
        load_checkpoint(tmp_path / "w.safetensors")
    h = config.hidden_size
    lora = {"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(4, h),
            "model.layers.0.self_attn.q_proj.lora.B.weight": torch.full((h, 4), float("nan"),
                                                                        dtype=torch.float16)}
    torch.save(lora, tmp_path / "l.pth")
    with pytest.raises(LoraError) as e:
        read_lora(tmp_path / "l.pth")
    assert str(e.value).startswith(f"{tmp_path / 'l.pth'}: LoRA tensor "
                                   f"model.layers.0.self_attn.q_proj.lora.B.weight holds {h * 4} ")
    with pytest.raises(LoraError, match="LoRA tensor model.layers.0.self_attn.q_proj.lora.B"):
        load(path, backend="torch", lora=tmp_path / "l.pth")


# --- tokenizer and chat template -------------------------------------------------------------------

def test_tokenizer_larger_than_the_vocabulary(tmp_path, tokenizer_dir, capsys):
    size = Tokenizer(tokenizer_dir).vocab_size
    config = tiny_config("minimind2", vocab_size=size - 1)
    path = save_pth(random_weights(config), tmp_path / "out" / "full_sft_128.pth")
    message = (f"the tokenizer in {tokenizer_dir} has {size} tokens but the model's vocabulary "
               f"has {size - 1}: it belongs to another model")
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        load(path, backend="torch", tokenizer=tokenizer_dir)
    assert to_hf.main([str(path), str(tmp_path / "hf"), "--tokenizer", str(tokenizer_dir),
                       "--quiet"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_empty_chat_templates(tmp_path):
    folder = build_tokenizer(tmp_path / "empty", chat_template="")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "  \n"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"the chat template 'default' is empty; give a template"):
        Tokenizer(folder)
    silent = build_tokenizer(tmp_path / "silent", chat_template="{% if false %}x{% endif %}")
    fmt = ChatFormatter(Tokenizer(silent))
    with pytest.raises(ValueError, match="renders these messages as an empty prompt"):
        fmt.encode([{"role": "user", "content": "hi"}])


# --- fuzz: random bytes and headers ------------------------------------------------------------------

CLEAR = (ValueError, OSError)  # CheckpointError, LoraError, TokenizerNotFoundError are among them
PREFIXES = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"{", b"\x08\x00\x00\x00\x00\x00\x00\x00"])


@FUZZ
@given(prefix=PREFIXES, body=st.binary(max_size=300),
       name=st.sampled_from(["w.safetensors", "w.pth", "tokenizer.json", "tokenizer_config.json",
                             "config.json", "l.pth"]))
def test_random_bytes_get_clear_errors(prefix, body, name):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        file = folder / name
        file.write_bytes(prefix + body)
        try:
            if name.startswith("tokenizer"):
                if name == "tokenizer_config.json":
                    (folder / "tokenizer.json").write_bytes(b"{}")
                Tokenizer(folder)
            elif name == "l.pth":
                read_lora(file)
            elif name == "config.json":
                save_file({"model.norm.weight": np.ones(4, np.float32)}, folder / "model.safetensors")
                load_checkpoint(folder)
            else:
                load_checkpoint(file)
        except CLEAR as e:
            assert str(e), type(e)


_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1, "F64": 8}
_ODD = st.one_of(st.integers(-8, 64), st.just(2**64), st.booleans(), st.floats(0, 4), st.none(),
                 st.text(max_size=2))


@st.composite
def headers(draw):
    """A valid header (tensors tiling the data), then one or two lies, each an offset, a tensor moved,
    a dimension, a dtype, the data length, an entry, the metadata, or two tensors swapped."""
    header, offset = {}, 0
    for name in draw(st.permutations(["a", "b", "c"]))[: draw(st.integers(0, 3))]:
        dtype = draw(st.sampled_from(sorted(_BYTES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * _BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data, names = offset, sorted(header)
    for _ in range(draw(st.integers(1, 2))):  # one lie, or two
        lie = draw(st.sampled_from(["none", "offset", "shift", "shape", "dtype", "data", "entry",
                                    "meta", "swap"]))
        if lie == "data":
            data = max(0, data + draw(st.integers(-8, 8)))
        elif lie == "meta":
            header["__metadata__"] = draw(st.one_of(st.just({"format": "pt"}), _ODD,
                                                    st.dictionaries(st.text(max_size=2), _ODD)))
        elif names and lie != "none":
            victim = header[draw(st.sampled_from(names))]
            if not isinstance(victim, dict):  # an earlier lie replaced it
                continue
            if lie == "offset":
                victim["data_offsets"][draw(st.integers(0, 1))] = draw(_ODD)
            elif lie == "shift" and all(type(o) is int for o in victim["data_offsets"]):
                delta = draw(st.integers(-8, 8))  # the same span elsewhere: gap, overlap, past end
                victim["data_offsets"] = [o + delta for o in victim["data_offsets"]]
            elif lie == "shape":
                victim["shape"] = draw(st.lists(_ODD, max_size=3))
            elif lie == "dtype":
                victim["dtype"] = draw(st.one_of(st.sampled_from(["F8_E4M3", "U16", "Q4", "f32"]), _ODD))
            elif lie == "entry":
                header[names[0]] = draw(_ODD)
            elif lie == "swap" and len(names) > 1:
                other = header[names[-1]]
                if isinstance(other, dict):
                    victim["data_offsets"], other["data_offsets"] = (other["data_offsets"],
                                                                     victim["data_offsets"])
    return header, data


@settings(FUZZ, max_examples=150)
@given(case=headers())
def test_headers_accepted_exactly_when_safetensors_accepts(case):
    """Held to the safetensors library's verdict: what it refuses we refuse with a
    CheckpointError; what it accepts we read to the same values (or refuse a dtype we do not
    read, naming it)."""
    header, data = case
    with tempfile.TemporaryDirectory() as tmp:
        path = st_file(Path(tmp) / "f.safetensors", header, bytes(i % 251 for i in range(data)))
        refused = stock_refuses(path)
        try:
            ours = read_safetensors(path)
        except CheckpointError as e:
            assert refused or "unsupported dtype" in str(e), (header, data, str(e))
            return
        assert not refused, (header, data)
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                if header[key]["dtype"] not in ("BF16",):
                    np.testing.assert_array_equal(ours[key], f.get_tensor(key))


@FUZZ
@given(data=st.dictionaries(
    st.sampled_from(["num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                     "max_position_embeddings", "num_hidden_layers", "hidden_size", "vocab_size",
                     "use_moe", "rope_scaling", "num_experts_per_tok", "model_type",
                     "norm_topk_prob", "head_dim", "intermediate_size"]),
    st.one_of(st.integers(-3, 2**40), st.floats(allow_nan=True), st.booleans(), st.none(),
              st.text(max_size=3), st.just({"type": "yarn", "factor": 0.0}),
              st.just([1]), st.sampled_from(["llama", "qwen3", "qwen3_moe"])),
    max_size=4))
def test_random_config_json_loads_or_is_refused_clearly(data, make_checkpoint_st):
    path = make_checkpoint_st
    (path.parent / "config.json").write_text(json.dumps(data))
    try:
        config = load_checkpoint(path).config
    except (CheckpointError, TokenizerNotFoundError) as e:
        assert str(e)
        return
    assert 0 < config.max_position_embeddings <= MAX_CONTEXT
    assert math.isfinite(config.rms_norm_eps) and config.rms_norm_eps > 0
    assert config.num_attention_heads * config.head_dim == 128


@pytest.fixture(scope="module")
def make_checkpoint_st(tmp_path_factory):
    """One dense MiniMind2 checkpoint as safetensors (read in milliseconds, for the fuzz test)."""
    config = tiny_config("minimind2")
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    save_file(random_weights(config), path)
    return path
