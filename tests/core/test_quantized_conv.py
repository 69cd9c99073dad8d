"""int8 kernels with quantized outputs against exact rounding of the float64 result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mono_quant.core.kernels.fbgemm import fbgemm_engine, fbgemm_exact, pack_int8_weight
from mono_quant.core.kernels.quantized_conv import (
    pack_int8_conv2d,
    quantized_conv2d,
    quantized_conv2d_exact,
    quantized_linear,
)

ENGINE = fbgemm_engine()
# Lightning tests earlier in a run leave torch.use_deterministic_algorithms(True) on.
pytestmark = pytest.mark.usefixtures("nondeterministic_algorithms")
needs_kernels = pytest.mark.skipif(
    ENGINE is None or not quantized_conv2d_exact(ENGINE) or not fbgemm_exact(255, ENGINE),
    reason="exact int8 kernels need the fbgemm or x86 engine on a VNNI CPU",
)
INPUT_SCALE, INPUT_ZERO_POINT = 0.03, 7
# The kernels may land one code away from exact rounding where a value lies within float32
# rounding of a tie. On random data that happens to a small fraction of the outputs.
MAX_MISMATCH_FRACTION = 0.01


def _codes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch._make_per_tensor_quantized_tensor(codes, INPUT_SCALE, INPUT_ZERO_POINT)


def _weight(shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    codes = torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)
    scale = torch.rand(shape[0], generator=generator) * 0.004 + 0.001
    bias = torch.randn(shape[0], generator=generator)
    return codes, scale, bias


def _expected(exact: torch.Tensor, relu: bool) -> tuple[torch.Tensor, float, int]:
    if relu:
        exact = exact.clamp_min(0)
    output_scale = float(exact.max() - exact.min()) / 255
    output_zero_point = round(-float(exact.min()) / output_scale)
    codes = (exact / output_scale).round() + output_zero_point
    return codes.clamp(0, 255), output_scale, output_zero_point


def _assert_within_one_code(output: torch.Tensor, expected: torch.Tensor) -> None:
    difference = (output.int_repr().double() - expected).abs()
    assert float(difference.max()) <= 1
    assert float((difference > 0).double().mean()) <= MAX_MISMATCH_FRACTION


@needs_kernels
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_quantized_conv2d_rounds_onto_output_grid(relu: bool, per_tensor: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = _codes((4, 16, 9, 9), generator)
    codes, scale, bias = _weight((24, 16, 3, 3), generator)
    if per_tensor:
        scale = scale[:1]
    packed = pack_int8_conv2d(codes, scale, bias, (1, 1), (1, 1), (1, 1), 1)
    weight = codes.double() * scale.double().view(-1, 1, 1, 1)
    exact = F.conv2d(x.dequantize().double(), weight, bias.double(), padding=1)
    expected, output_scale, output_zero_point = _expected(exact, relu)

    output = quantized_conv2d(x, packed, relu, output_scale, output_zero_point)

    assert output.shape == exact.shape
    _assert_within_one_code(output, expected)


@needs_kernels
def test_quantized_conv2d_groups_and_stride() -> None:
    generator = torch.Generator().manual_seed(1)
    x = _codes((2, 8, 10, 10), generator)
    codes, scale, bias = _weight((8, 4, 3, 3), generator)
    packed = pack_int8_conv2d(codes, scale, bias, (2, 2), (0, 0), (1, 1), 2)
    weight = codes.double() * scale.double().view(-1, 1, 1, 1)
    exact = F.conv2d(x.dequantize().double(), weight, bias.double(), stride=2, groups=2)
    expected, output_scale, output_zero_point = _expected(exact, False)

    output = quantized_conv2d(x, packed, False, output_scale, output_zero_point)

    _assert_within_one_code(output, expected)


@needs_kernels
@pytest.mark.parametrize("relu", [False, True])
def test_quantized_linear_rounds_onto_output_grid(relu: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    x = _codes((32, 96), generator)
    codes, scale, bias = _weight((40, 96), generator)
    packed = pack_int8_weight(codes, scale, None, bias)
    exact = F.linear(x.dequantize().double(), codes.double() * scale.double()[:, None])
    expected, output_scale, output_zero_point = _expected(exact + bias.double(), relu)

    output = quantized_linear(x, packed, relu, output_scale, output_zero_point)

    _assert_within_one_code(output, expected)


def test_unknown_engine_is_not_exact() -> None:
    assert not quantized_conv2d_exact("qnnpack")
    assert not quantized_conv2d_exact("no-such-engine")
