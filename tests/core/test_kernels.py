"""Tests for the int8 weight-only linear kernel and its dispatch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mono_quant.core.kernels import (
    INT8PACK_MAX_ROWS,
    has_int8pack_mm,
    int8_weight_linear,
    int8_weight_linear_reference,
    int8pack_applies,
)

BFLOAT16_EPS = torch.finfo(torch.bfloat16).eps
IN_FEATURES = 256
OUT_FEATURES = 96

needs_int8pack = pytest.mark.skipif(
    not has_int8pack_mm(), reason="aten._weight_int8pack_mm is missing or fails in this torch build"
)


def int8_weight(
    out_features: int, in_features: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (int8 codes, float32 per-channel scale, float32 bias) with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out_features, in_features), generator=generator)
    scale = torch.rand(out_features, generator=generator) * 0.01 + 0.001
    bias = torch.randn(out_features, generator=generator)
    return codes.to(torch.int8), scale, bias


def random_input(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def bfloat16_tolerance(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Bound the difference of two bfloat16 evaluations of the same linear layer, per output.

    The reference rounds each dequantized weight to bfloat16, which moves each product term
    ``x_k * w_k`` by up to one unit roundoff u = eps / 2. Those K roundings are independent, so
    their sum has a standard deviation of ``u / sqrt(3) * ||x * w||_2``, and 1.5 eps = 3 u is
    more than 5 standard deviations. The kernel rounds the scale (at most u of the output), both
    round the output once, and the kernel adds the bias after one more rounding: 2 eps of
    ``|output| + |bias|`` covers those four.
    """
    dequantized = weight.float() * scale.unsqueeze(1)
    x_float = x.float()
    term_norm = (x_float.square() @ dequantized.square().T).sqrt()
    magnitude = (x_float @ dequantized.T).abs()
    if bias is not None:
        magnitude = magnitude + 2 * bias.abs()
    return BFLOAT16_EPS * (1.5 * term_norm + 2 * magnitude)


# ---------------------------------------------------------------------------------------------
# Kernel against the reference


@needs_int8pack
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, IN_FEATURES), id="rows1"),
        pytest.param((8, IN_FEATURES), id="rows8"),
        pytest.param((32, IN_FEATURES), id="rows32"),
        pytest.param((2, 4, IN_FEATURES), id="batch2_tokens4"),
    ],
)
def test_kernel_matches_reference_bfloat16(shape: tuple[int, ...], with_bias: bool) -> None:
    weight, scale, bias = int8_weight(OUT_FEATURES, IN_FEATURES, seed=0)
    bias = bias if with_bias else None
    x = random_input(shape, seed=1, dtype=torch.bfloat16)

    output = int8_weight_linear(x, weight, scale, bias)
    expected = int8_weight_linear_reference(x, weight, scale, bias)

    difference = (output.float() - expected.float()).abs()
    tolerance = bfloat16_tolerance(x, weight, scale, bias)
    worst = float((difference / tolerance).max())
    assert int8pack_applies(x, weight)
    assert output.dtype == torch.bfloat16
    assert output.shape == (*shape[:-1], OUT_FEATURES)
    assert bool((difference <= tolerance).all()), f"difference reaches {worst:.2f} of tolerance"


@needs_int8pack
def test_kernel_close_to_float32_result() -> None:
    weight, scale, bias = int8_weight(OUT_FEATURES, IN_FEATURES, seed=2)
    x = random_input((4, IN_FEATURES), seed=3, dtype=torch.bfloat16)

    output = int8_weight_linear(x, weight, scale, bias)
    exact = F.linear(x.float(), weight.float() * scale.unsqueeze(1), bias)

    tolerance = bfloat16_tolerance(x, weight, scale, bias)
    assert bool(((output.float() - exact).abs() <= tolerance).all())


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((INT8PACK_MAX_ROWS + 1, IN_FEATURES), id="rows_over_limit"),
        pytest.param((64, IN_FEATURES), id="rows64"),
        pytest.param((3, 100), id="features_not_multiple_of_16"),
        pytest.param((1, 40), id="features40"),
    ],
)
def test_fallback_equals_reference_bfloat16(shape: tuple[int, ...]) -> None:
    weight, scale, bias = int8_weight(OUT_FEATURES, shape[-1], seed=4)
    x = random_input(shape, seed=5, dtype=torch.bfloat16)

    # Checked first, because a wrong dispatch would hand the kernel an input it cannot read.
    assert not int8pack_applies(x, weight)

    output = int8_weight_linear(x, weight, scale, bias)
    expected = int8_weight_linear_reference(x, weight, scale, bias)

    assert torch.equal(output, expected)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, IN_FEATURES), id="rows1"),
        pytest.param((8, IN_FEATURES), id="rows8"),
        pytest.param((3, 5, IN_FEATURES), id="3d"),
    ],
)
def test_float32_path_equals_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    weight, scale, bias = int8_weight(OUT_FEATURES, IN_FEATURES, seed=6)
    bias = bias if with_bias else None
    x = random_input(shape, seed=7, dtype=torch.float32)

    output = int8_weight_linear(x, weight, scale, bias)
    expected = F.linear(x, weight.float() * scale.unsqueeze(1), bias)

    assert output.dtype == torch.float32
    assert torch.equal(output, expected)


# ---------------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize(
    ("shape", "dtype", "weight_dtype"),
    [
        pytest.param((4, IN_FEATURES), torch.float32, torch.int8, id="float32_input"),
        pytest.param((4, IN_FEATURES), torch.float64, torch.int8, id="float64_input"),
        pytest.param((INT8PACK_MAX_ROWS + 1, IN_FEATURES), torch.bfloat16, torch.int8, id="rows33"),
        pytest.param((3, 11, IN_FEATURES), torch.bfloat16, torch.int8, id="3d_rows33"),
        pytest.param((0, IN_FEATURES), torch.bfloat16, torch.int8, id="empty_rows"),
        pytest.param((4, 0), torch.bfloat16, torch.int8, id="empty_features"),
        pytest.param((4, 100), torch.bfloat16, torch.int8, id="features100"),
        pytest.param((4, IN_FEATURES), torch.bfloat16, torch.uint8, id="uint8_weight"),
    ],
)
def test_dispatch_rejects(
    shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype
) -> None:
    x = torch.zeros(shape, dtype=dtype)
    weight = torch.zeros(OUT_FEATURES, shape[-1], dtype=weight_dtype)

    assert not int8pack_applies(x, weight)


@needs_int8pack
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        pytest.param((1, IN_FEATURES), torch.bfloat16, id="bf16_rows1"),
        pytest.param((INT8PACK_MAX_ROWS, IN_FEATURES), torch.bfloat16, id="bf16_rows32"),
        pytest.param((2, 16, IN_FEATURES), torch.bfloat16, id="bf16_3d_rows32"),
        pytest.param((4, 16), torch.bfloat16, id="bf16_features16"),
        pytest.param((4, IN_FEATURES), torch.float16, id="fp16_rows4"),
    ],
)
def test_dispatch_accepts(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.zeros(shape, dtype=dtype)
    weight = torch.zeros(OUT_FEATURES, shape[-1], dtype=torch.int8)

    assert int8pack_applies(x, weight)


def test_dispatch_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import mono_quant.core.kernels.int8pack as kernels

    monkeypatch.setattr(kernels, "has_int8pack_mm", lambda: False)
    x = torch.zeros(1, IN_FEATURES, dtype=torch.bfloat16)
    weight = torch.zeros(OUT_FEATURES, IN_FEATURES, dtype=torch.int8)

    assert not kernels.int8pack_applies(x, weight)


# The AVX-512 kernel reads 16 bfloat16 values with an aligned load, so an input view whose data
# pointer is not 32-byte aligned would crash the process. The check runs in a subprocess so that
# a crash fails this test instead of ending the pytest session.
_UNALIGNED_SCRIPT = textwrap.dedent(
    """
    import torch
    from mono_quant.core.kernels import (
        int8_weight_linear,
        int8_weight_linear_reference,
        int8pack_applies,
    )

    generator = torch.Generator().manual_seed(0)
    storage = torch.randn(1000, generator=generator).to(torch.bfloat16)
    x = storage[3 : 3 + 2 * 64].view(2, 64)
    weight = torch.randint(-128, 128, (16, 64), generator=generator).to(torch.int8)
    scale = torch.rand(16, generator=generator) * 0.01 + 0.001
    if not int8pack_applies(x, weight) or x.data_ptr() % 32 == 0:
        raise SystemExit(4)
    output = int8_weight_linear(x, weight, scale, None)
    expected = int8_weight_linear_reference(x, weight, scale, None)
    # Coarse on purpose: a misread row gives errors near the output size, and
    # test_kernel_matches_reference_bfloat16 checks the rounding error itself.
    error = float((output.float() - expected.float()).abs().max())
    bound = float(expected.float().abs().max()) * 0.05
    raise SystemExit(0 if error <= bound else 3)
    """
)
EXIT_MEANINGS = {3: "output differs from the reference", 4: "the kernel path was not taken"}


@needs_int8pack
def test_kernel_unaligned_input_view() -> None:
    source_root = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", _UNALIGNED_SCRIPT],
        env={"PYTHONPATH": str(source_root), "PATH": ""},
        capture_output=True,
        timeout=120,
    )

    meaning = EXIT_MEANINGS.get(result.returncode, "crashed or failed")
    assert result.returncode == 0, f"exit status {result.returncode}: {meaning}"
