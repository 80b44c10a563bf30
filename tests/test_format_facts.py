"""Format facts defined once in minimind_core.checkpoint and used by every reader and writer:
the DDP / torch.compile key prefixes and the weight-file suffixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minimind_core.checkpoint import (
    TORCH_SUFFIXES,
    WEIGHT_SUFFIXES,
    CheckpointError,
    read_tensor_file,
    strip_prefixes,
)


@pytest.mark.parametrize("key", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.",
                                 "module.module.", ""])
def test_strip_prefixes_any_nesting(key):
    assert strip_prefixes(key + "model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_strip_prefixes_leaves_inner_names_alone():
    assert strip_prefixes("model.module.weight") == "model.module.weight"
    assert strip_prefixes("modules.x") == "modules.x"


def test_suffixes():
    assert set(TORCH_SUFFIXES) == {".pth", ".pt", ".bin", ".ckpt"}
    assert set(WEIGHT_SUFFIXES) == set(TORCH_SUFFIXES) | {".safetensors"}


def test_unsupported_file_names_every_suffix(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unsupported file type '.gguf'") as e:
        read_tensor_file(bad)
    assert all(s in str(e.value) for s in WEIGHT_SUFFIXES)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_torch_files_under_every_suffix_are_read(suffix, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / f"w{suffix}"
    torch.save({"module.a": torch.arange(3, dtype=torch.float32)}, path)
    raw = read_tensor_file(path)
    np.testing.assert_array_equal(np.asarray(raw["module.a"]), [0, 1, 2])


def test_merge_writes_a_torch_file_under_every_torch_suffix():
    from converters.merge_lora import output_format

    assert {output_format(Path(f"m{s}"), None) for s in TORCH_SUFFIXES} == {"pth"}
    assert output_format(Path("m.safetensors"), None) == "safetensors"
    with pytest.raises(ValueError, match="unknown output type '.gguf'"):
        output_format(Path("m.gguf"), None)


def test_mlx_engine_caches_every_torch_suffix(tmp_path, monkeypatch):
    pytest.importorskip("mlx.core")
    from backends.mlx import engine

    seen = []
    monkeypatch.setattr(engine, "_load_pth_cached", lambda p, o: seen.append(p.suffix) or (None, None))
    for s in TORCH_SUFFIXES:
        (tmp_path / f"w{s}").write_bytes(b"x")
        engine.load_source(tmp_path / f"w{s}", {})
    assert seen == list(TORCH_SUFFIXES)
