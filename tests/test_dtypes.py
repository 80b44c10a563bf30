"""dtype names and aliases: one table (minimind_core.dtypes) behind both backends and converters."""

from __future__ import annotations

import pytest

from minimind_core.dtypes import DTYPE_NAMES, canonical_dtype

ALIASES = {"float32": ["float32", "fp32", "f32", "FP32"],
           "float16": ["float16", "fp16", "half", "Float16"],
           "bfloat16": ["bfloat16", "bf16", "BF16"]}


@pytest.mark.parametrize("canonical,names", ALIASES.items())
def test_aliases(canonical, names):
    assert canonical in DTYPE_NAMES
    assert {canonical_dtype(n) for n in names} == {canonical}


@pytest.mark.parametrize("bad", ["float8", "int4", "", "fp 16", "auto", None, 16])
def test_unknown_names_say_the_choices(bad):
    with pytest.raises(ValueError, match=r"^unknown dtype .*; choose from float32, float16, bfloat16$"):
        canonical_dtype(bad)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        canonical_dtype("float8")


def test_torch_backend_maps_every_alias():
    torch = pytest.importorskip("torch")
    from backends.torch.engine import resolve_dtype

    cpu = torch.device("cpu")
    want = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for canonical, names in ALIASES.items():
        assert {resolve_dtype(n, cpu) for n in names} == {want[canonical]}
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from float32"):
        resolve_dtype("int8", cpu)


def test_mlx_backend_maps_every_alias():
    mx = pytest.importorskip("mlx.core")
    from backends.mlx.load import dtype_name, parse_dtype

    want = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    for canonical, names in ALIASES.items():
        assert {parse_dtype(n) for n in names} == {want[canonical]}
        assert dtype_name(want[canonical]) == canonical
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from float32"):
        parse_dtype("int8")
