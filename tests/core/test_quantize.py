"""Tests for quantization specs, block layout, qparams and quantize/dequantize/fake_quantize."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
import torch

from mono_quant.core.layout import from_blocks, qparams_shape, to_blocks
from mono_quant.core.qparams import MIN_SCALE, choose_qparams, min_max
from mono_quant.core.quantize import (
    dequantize,
    fake_quantize,
    quantize,
    quantize_tensor,
    storage_dtype,
)
from mono_quant.core.spec import QuantSpec

FLOAT32_EPS = torch.finfo(torch.float32).eps

# (shape, spec keyword arguments) for every granularity, including per_group rows whose length
# is not a multiple of group_size.
GRANULARITY_CASES = [
    pytest.param((17, 33), {"granularity": "per_tensor"}, id="per_tensor"),
    pytest.param((16, 40), {"granularity": "per_channel", "axis": 0}, id="per_channel_axis0"),
    pytest.param((6, 9, 5), {"granularity": "per_channel", "axis": 1}, id="per_channel_axis1"),
    pytest.param((4, 5, 7), {"granularity": "per_channel", "axis": -1}, id="per_channel_axis-1"),
    pytest.param((8, 128), {"granularity": "per_group", "group_size": 32}, id="per_group_g32"),
    pytest.param((6, 100), {"granularity": "per_group", "group_size": 32}, id="per_group_ragged"),
    pytest.param((4, 3, 10), {"granularity": "per_group", "group_size": 16}, id="per_group_3d"),
    pytest.param((3, 5, 64), {"granularity": "per_token"}, id="per_token"),
]

SYMMETRY = [pytest.param(True, id="symmetric"), pytest.param(False, id="affine")]


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Draw normal values with a different spread per leading index, so blocks differ."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        spread = torch.rand(shape[0], generator=generator) * 4 + 0.1
        values = values * spread.reshape(-1, *[1] * (len(shape) - 1))
    return values


def qparams_of(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return choose_qparams(*min_max(x, spec), spec)


def to_float32(value: float) -> float:
    """Round a Python float to the nearest float32, as one float32 operation would."""
    return struct.unpack("f", struct.pack("f", value))[0]


# ---------------------------------------------------------------------------------------------
# QuantSpec


@pytest.mark.parametrize(
    ("bits", "symmetric", "quant_min", "quant_max"),
    [
        pytest.param(2, True, -2, 1, id="int2_symmetric"),
        pytest.param(2, False, 0, 3, id="int2_affine"),
        pytest.param(4, True, -8, 7, id="int4_symmetric"),
        pytest.param(4, False, 0, 15, id="int4_affine"),
        pytest.param(8, True, -128, 127, id="int8_symmetric"),
        pytest.param(8, False, 0, 255, id="int8_affine"),
    ],
)
def test_spec_grid_limits(bits: int, symmetric: bool, quant_min: int, quant_max: int) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric)

    assert spec.quant_min == quant_min
    assert spec.quant_max == quant_max


@pytest.mark.parametrize(
    ("symmetric", "dtype"),
    [pytest.param(True, torch.int8, id="symmetric"), pytest.param(False, torch.uint8, id="affine")],
)
def test_storage_dtype(symmetric: bool, dtype: torch.dtype) -> None:
    assert storage_dtype(QuantSpec(symmetric=symmetric)) == dtype


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"bits": 1}, ValueError, "bits=1 is not supported", id="bits1"),
        pytest.param({"bits": 9}, ValueError, "bits=9 is not supported", id="bits9"),
        pytest.param({"bits": True}, TypeError, "bits must be an int", id="bits_bool"),
        pytest.param({"bits": 4.0}, TypeError, "bits must be an int", id="bits_float"),
        pytest.param(
            {"granularity": "per_row"}, ValueError, "granularity='per_row'", id="granularity"
        ),
        pytest.param(
            {"granularity": "per_group"},
            ValueError,
            "needs a positive group_size, got None",
            id="group_size_missing",
        ),
        pytest.param(
            {"granularity": "per_group", "group_size": 0},
            ValueError,
            "needs a positive group_size, got 0",
            id="group_size0",
        ),
        pytest.param(
            {"granularity": "per_group", "group_size": -1},
            ValueError,
            "needs a positive group_size, got -1",
            id="group_size-1",
        ),
        pytest.param(
            {"granularity": "per_channel", "group_size": 32},
            ValueError,
            "group_size=32 is only used with granularity='per_group'",
            id="group_size_per_channel",
        ),
    ],
)
def test_spec_rejects_invalid(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


# ---------------------------------------------------------------------------------------------
# Layout


LAYOUT_CASES = [
    pytest.param((), {"granularity": "per_tensor"}, id="per_tensor_0d"),
    pytest.param((5,), {"granularity": "per_tensor"}, id="per_tensor_1d"),
    pytest.param((3, 4, 5), {"granularity": "per_tensor"}, id="per_tensor_3d"),
    pytest.param((7,), {"granularity": "per_channel", "axis": 0}, id="per_channel_1d"),
    pytest.param((3, 4, 5), {"granularity": "per_channel", "axis": 0}, id="per_channel_axis0"),
    pytest.param((3, 4, 5), {"granularity": "per_channel", "axis": 1}, id="per_channel_axis1"),
    pytest.param((3, 4, 5), {"granularity": "per_channel", "axis": -1}, id="per_channel_axis-1"),
    pytest.param((2, 3, 3, 3), {"granularity": "per_channel", "axis": 1}, id="per_channel_4d"),
    pytest.param((3, 4, 5), {"granularity": "per_group", "group_size": 4}, id="per_group_even"),
    pytest.param((3, 4, 5), {"granularity": "per_group", "group_size": 7}, id="per_group_ragged"),
    pytest.param((2, 10), {"granularity": "per_group", "group_size": 64}, id="per_group_wide"),
    pytest.param((5,), {"granularity": "per_token"}, id="per_token_1d"),
    pytest.param((3, 4, 5), {"granularity": "per_token"}, id="per_token_3d"),
]


@pytest.mark.parametrize(("shape", "spec_kwargs"), LAYOUT_CASES)
def test_layout_round_trip(shape: tuple[int, ...], spec_kwargs: dict) -> None:
    spec = QuantSpec(**spec_kwargs)
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)

    blocks = to_blocks(x, spec)

    assert tuple(blocks.shape[:-1]) == qparams_shape(x.shape, spec)
    assert torch.equal(from_blocks(blocks, spec, x.shape), x)


def test_layout_pads_last_group_with_zeros() -> None:
    spec = QuantSpec(granularity="per_group", group_size=4)
    x = torch.arange(1, 11, dtype=torch.float32).reshape(1, 10)

    blocks = to_blocks(x, spec)

    assert blocks.shape == (1, 3, 4)
    assert blocks[0, 2].tolist() == [9.0, 10.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("shape", "spec_kwargs", "match"),
    [
        pytest.param(
            (3, 4), {"granularity": "per_channel", "axis": 2}, "axis=2 is out of range", id="axis2"
        ),
        pytest.param(
            (3, 4),
            {"granularity": "per_channel", "axis": -3},
            "axis=-3 is out of range",
            id="axis-3",
        ),
        pytest.param(
            (12,),
            {"granularity": "per_group", "group_size": 4},
            "per_group needs a tensor with at least two dimensions",
            id="per_group_1d",
        ),
        pytest.param((), {"granularity": "per_token"}, "per_token needs", id="per_token_0d"),
    ],
)
def test_layout_rejects_rank(shape: tuple[int, ...], spec_kwargs: dict, match: str) -> None:
    x = torch.zeros(shape)

    with pytest.raises(ValueError, match=match):
        to_blocks(x, QuantSpec(**spec_kwargs))


# ---------------------------------------------------------------------------------------------
# Qparams


ZERO_RANGE_CASES = [
    pytest.param("mixed", id="mixed"),
    pytest.param("positive", id="positive"),
    pytest.param("negative", id="negative"),
    pytest.param("wide", id="wide"),
    pytest.param("narrow", id="narrow"),
]


def ranged_tensor(kind: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 20, generator=generator)
    if kind == "mixed":
        return x * 3 - 1
    if kind == "positive":
        return x + 0.5
    if kind == "negative":
        return -(x * 7 + 0.25)
    if kind == "wide":
        return (x - 0.3) * 1e4
    return (x - 0.6) * 1e-3


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", range(2, 9), ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("kind", ZERO_RANGE_CASES)
def test_zero_exactly_representable(
    kind: str, granularity: str, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity)
    x = ranged_tensor(kind, seed=bits)
    scale, zero_point = qparams_of(x, spec)

    zeros = torch.zeros_like(x)
    restored = dequantize(quantize(zeros, scale, zero_point, spec), scale, zero_point, spec)

    assert int(zero_point.min()) >= spec.quant_min
    assert int(zero_point.max()) <= spec.quant_max
    assert torch.equal(restored, zeros)


DEGENERATE_CASES = [
    pytest.param(torch.full((4, 6), 2.5), id="constant_positive"),
    pytest.param(torch.full((4, 6), -7.0), id="constant_negative"),
    pytest.param(torch.zeros(4, 6), id="all_zero"),
    pytest.param(
        torch.cat([torch.linspace(-1, 2, 6).reshape(1, 6), torch.zeros(1, 6)]), id="zero_channel"
    ),
    pytest.param(torch.tensor([[3e38, -3e38, 1.0], [-2.9e38, 0.0, 3e38]]), id="near_float_max"),
    pytest.param(torch.tensor([[1e-38, -2e-39, 0.0]]), id="subnormal"),
]


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", [2, 8], ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_token"])
@pytest.mark.parametrize("x", DEGENERATE_CASES)
def test_qparams_degenerate_ranges(
    x: torch.Tensor, granularity: str, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity)

    q, scale, zero_point = quantize_tensor(x, spec)
    restored = dequantize(q, scale, zero_point, spec)

    assert bool(torch.isfinite(scale).all()), f"scale {scale}"
    assert bool((scale > 0).all()), f"scale {scale}"
    assert bool((scale >= MIN_SCALE).all()), f"scale {scale}"
    assert not bool(torch.isnan(restored).any()), f"dequantized {restored}"
    assert torch.equal(restored[x == 0], x[x == 0])


NEAR_FLOAT_MAX = [3e38, -3e38, 1.0, -2.9e38]
AT_FLOAT_MAX = [3.4e38, -3.4e38, 0.5]


@pytest.mark.parametrize(
    ("values", "bits", "symmetric"),
    [
        pytest.param(NEAR_FLOAT_MAX, 2, True, id="3e38_int2_symmetric"),
        pytest.param(NEAR_FLOAT_MAX, 8, True, id="3e38_int8_symmetric"),
        pytest.param(AT_FLOAT_MAX, 2, True, id="3.4e38_int2_symmetric"),
        pytest.param(AT_FLOAT_MAX, 8, True, id="3.4e38_int8_symmetric"),
        pytest.param(NEAR_FLOAT_MAX, 2, False, id="3e38_int2_affine"),
        pytest.param(NEAR_FLOAT_MAX, 4, False, id="3e38_int4_affine"),
        pytest.param(NEAR_FLOAT_MAX, 8, False, id="3e38_int8_affine"),
        pytest.param(AT_FLOAT_MAX, 4, False, id="3.4e38_int4_affine"),
        pytest.param(AT_FLOAT_MAX, 8, False, id="3.4e38_int8_affine"),
    ],
)
def test_dequantize_near_float_max_finite(values: list[float], bits: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = torch.tensor(values)

    q, scale, zero_point = quantize_tensor(x, spec)
    restored = dequantize(q, scale, zero_point, spec)

    assert bool(torch.isfinite(scale).all()), f"scale {scale}"
    assert bool(torch.isfinite(restored).all()), f"dequantized {restored}"


@pytest.mark.parametrize(
    ("bad_value", "match"),
    [
        pytest.param(float("nan"), "min_val contains 1 NaN and 0 infinite", id="nan"),
        pytest.param(float("inf"), "min_val contains 0 NaN and 1 infinite", id="inf"),
        pytest.param(float("-inf"), "min_val contains 0 NaN and 1 infinite", id="-inf"),
    ],
)
def test_choose_qparams_rejects_nonfinite(bad_value: float, match: str) -> None:
    min_val = torch.tensor([-1.0, bad_value, -0.5])
    max_val = torch.tensor([1.0, 2.0, 0.5])

    with pytest.raises(ValueError, match=match):
        choose_qparams(min_val, max_val, QuantSpec(granularity="per_channel"))


def test_choose_qparams_rejects_nonfinite_max() -> None:
    with pytest.raises(ValueError, match="max_val contains 1 NaN"):
        choose_qparams(torch.tensor(-1.0), torch.tensor(float("nan")), QuantSpec())


def test_choose_qparams_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"min_val shape \(3,\) and max_val shape \(2,\) differ"):
        choose_qparams(torch.zeros(3), torch.ones(2), QuantSpec(granularity="per_channel"))


# ---------------------------------------------------------------------------------------------
# Quantize and dequantize


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize(("shape", "spec_kwargs"), GRANULARITY_CASES)
def test_round_trip_error_within_half_step(
    shape: tuple[int, ...], spec_kwargs: dict, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, **spec_kwargs)
    x = random_tensor(shape, seed=bits * 10 + symmetric)

    q, scale, zero_point = quantize_tensor(x, spec)
    restored = dequantize(q, scale, zero_point, spec)

    error_blocks = to_blocks((restored - x).abs(), spec)
    # Half a step, plus half a float32 ulp of x because dequantize rounds its result to float32.
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-5) + to_blocks(x.abs(), spec) * FLOAT32_EPS / 2
    worst = float((error_blocks - bound).max())
    assert restored.shape == x.shape
    assert restored.dtype == torch.float32
    assert bool((error_blocks <= bound).all()), f"error exceeds scale/2 by up to {worst}"


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize(("shape", "spec_kwargs"), GRANULARITY_CASES)
def test_codes_within_grid(
    shape: tuple[int, ...], spec_kwargs: dict, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, **spec_kwargs)
    x = random_tensor(shape, seed=bits)

    q, scale, zero_point = quantize_tensor(x, spec)

    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert q.shape == x.shape
    assert int(q.min()) >= spec.quant_min
    assert int(q.max()) <= spec.quant_max
    assert tuple(scale.shape) == qparams_shape(x.shape, spec)
    assert scale.dtype == torch.float32
    assert zero_point.dtype == torch.int32
    if symmetric:
        assert bool((zero_point == 0).all())


@pytest.mark.parametrize("symmetric", SYMMETRY)
def test_quantize_clamps_outside_range(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric)
    scale = torch.tensor(0.5)
    zero_point = torch.tensor(0 if symmetric else 8, dtype=torch.int32)
    x = torch.tensor([-100.0, 100.0])

    q = quantize(x, scale, zero_point, spec)

    assert q.tolist() == [spec.quant_min, spec.quant_max]


def test_quantize_rounds_half_to_even() -> None:
    spec = QuantSpec(bits=8)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])

    q = quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), spec)

    assert q.tolist() == [0, 2, 2, 0, -2]


@pytest.mark.parametrize(
    ("spec", "scale_shape"),
    [
        pytest.param(QuantSpec(granularity="per_channel"), (5,), id="per_channel"),
        pytest.param(QuantSpec(), (4,), id="per_tensor"),
        pytest.param(QuantSpec(granularity="per_group", group_size=2), (4,), id="per_group"),
    ],
)
def test_quantize_rejects_scale_shape(spec: QuantSpec, scale_shape: tuple[int, ...]) -> None:
    x = torch.zeros(4, 6)
    scale = torch.ones(scale_shape)
    zero_point = torch.zeros(scale_shape, dtype=torch.int32)

    with pytest.raises(ValueError, match=r"scale has shape .* needs"):
        quantize(x, scale, zero_point, spec)
    with pytest.raises(ValueError, match=r"scale has shape .* needs"):
        dequantize(x.to(torch.int8), scale, zero_point, spec)
    with pytest.raises(ValueError, match=r"scale has shape .* needs"):
        fake_quantize(x, scale, zero_point, spec)


# ---------------------------------------------------------------------------------------------
# Bit-exact comparison with a scalar reference


def reference_qparams(values: list[float], spec: QuantSpec) -> tuple[float, int]:
    """Compute (scale, zero_point) of one block with Python scalars rounded to float32."""
    min_neg = min(min(values), 0.0)
    max_pos = max(max(values), 0.0)
    levels = float(spec.quant_max - spec.quant_min)
    if spec.symmetric:
        scale = to_float32(max(-min_neg, max_pos) / to_float32(levels / 2))
        return max(scale, FLOAT32_EPS), 0
    scale = to_float32(to_float32(max_pos / levels) - to_float32(min_neg / levels))
    scale = max(scale, FLOAT32_EPS)
    zero_point = spec.quant_min - round(to_float32(min_neg / scale))
    return scale, min(max(zero_point, spec.quant_min), spec.quant_max)


def tie_pattern(spec: QuantSpec, length: int) -> list[float]:
    """Return block values whose scale is exactly 0.25 (affine) or 0.5 (symmetric), with ties.

    The first value is the block maximum ``levels * 0.25``. Odd multiples of 0.125 then sit
    halfway between two affine codes, and odd multiples of 0.25 halfway between two symmetric
    codes, so rounding half to even decides their codes.
    """
    step = 0.25
    levels = spec.quant_max - spec.quant_min
    ties = [multiple * step for multiple in (0.5, 1.5, 2.5, 1.0, 3.0, 5.0) if multiple <= levels]
    pattern = [levels * step, *ties]
    return [pattern[index % len(pattern)] for index in range(length)]


def reference_code(value: float, scale: float, zero_point: int, spec: QuantSpec) -> int:
    # Python's round() rounds half to even, like torch.round.
    code = round(to_float32(value / scale)) + zero_point
    return min(max(code, spec.quant_min), spec.quant_max)


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        pytest.param((6, 7), 0, id="2d_axis0"),
        pytest.param((5, 4, 3), 1, id="3d_axis1"),
        pytest.param((3, 4, 5), -1, id="3d_axis-1"),
    ],
)
def test_per_channel_matches_reference(
    shape: tuple[int, ...], axis: int, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="per_channel", axis=axis)
    x = random_tensor(shape, seed=100 + bits)
    channel_axis = axis % len(shape)
    first_channel = x.select(channel_axis, 0)
    first_channel.copy_(
        torch.tensor(tie_pattern(spec, first_channel.numel())).reshape_as(first_channel)
    )
    channels = shape[channel_axis]

    indices = list(itertools.product(*(range(size) for size in shape)))
    channel_values: list[list[float]] = [[] for _ in range(channels)]
    for index in indices:
        channel_values[index[channel_axis]].append(float(x[index]))
    qparams = [reference_qparams(values, spec) for values in channel_values]
    expected = torch.empty(shape, dtype=torch.int64)
    for index in indices:
        scale, zero_point = qparams[index[channel_axis]]
        expected[index] = reference_code(float(x[index]), scale, zero_point, spec)

    q, scale, zero_point = quantize_tensor(x, spec)

    assert scale.tolist() == [block_scale for block_scale, _ in qparams]
    assert zero_point.tolist() == [block_zero_point for _, block_zero_point in qparams]
    assert torch.equal(q.to(torch.int64), expected)


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda bits: f"bits{bits}")
@pytest.mark.parametrize(
    ("shape", "group_size"),
    [
        pytest.param((4, 32), 8, id="even"),
        pytest.param((5, 30), 8, id="ragged"),
        pytest.param((3, 2, 7), 5, id="3d_ragged"),
        pytest.param((2, 6), 16, id="group_wider_than_row"),
    ],
)
def test_per_group_matches_reference(
    shape: tuple[int, ...], group_size: int, bits: int, symmetric: bool
) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="per_group", group_size=group_size)
    x = random_tensor(shape, seed=200 + bits)
    row_length = math.prod(shape[1:])
    group_pattern = tie_pattern(spec, group_size)
    first_row = [group_pattern[column % group_size] for column in range(row_length)]
    x[0] = torch.tensor(first_row).reshape(shape[1:])
    rows = x.reshape(shape[0], -1).tolist()

    expected_scale, expected_zero_point, expected_codes = [], [], []
    for row in rows:
        groups = [row[start : start + group_size] for start in range(0, len(row), group_size)]
        row_qparams = [reference_qparams(group, spec) for group in groups]
        expected_scale.append([block_scale for block_scale, _ in row_qparams])
        expected_zero_point.append([block_zero_point for _, block_zero_point in row_qparams])
        for column, value in enumerate(row):
            scale, zero_point = row_qparams[column // group_size]
            expected_codes.append(reference_code(value, scale, zero_point, spec))

    q, scale, zero_point = quantize_tensor(x, spec)

    assert scale.tolist() == expected_scale
    assert zero_point.tolist() == expected_zero_point
    assert q.flatten().tolist() == expected_codes


# ---------------------------------------------------------------------------------------------
# fake_quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), GRANULARITY_CASES)
def test_fake_quantize_matches_round_trip(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool, dtype: torch.dtype
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = random_tensor(shape, seed=7).to(dtype)
    scale, zero_point = qparams_of(x, spec)

    fake = fake_quantize(x, scale, zero_point, spec)
    expected = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec, dtype)

    assert fake.dtype == dtype
    assert torch.equal(fake, expected)


@pytest.mark.parametrize(
    ("spec", "scale", "zero_point", "inside", "outside"),
    [
        # The grid is [-128, 127] * 0.1, so x is inside while round(x / 0.1) lies in [-128, 127].
        pytest.param(
            QuantSpec(bits=8),
            0.1,
            0,
            [0.0, 1.0, -12.0, 12.6, -12.8],
            [13.0, -13.0, 12.9, 100.0],
            id="int8_symmetric",
        ),
        # The grid is [0, 15] with zero_point 10 and scale 0.5, so x is inside on [-5.25, 2.75).
        pytest.param(
            QuantSpec(bits=4, symmetric=False),
            0.5,
            10,
            [-5.0, 0.0, 2.5, -4.9],
            [-6.0, 3.0, 10.0],
            id="int4_affine",
        ),
    ],
)
def test_fake_quantize_straight_through_gradient(
    spec: QuantSpec, scale: float, zero_point: int, inside: list[float], outside: list[float]
) -> None:
    x = torch.tensor(inside + outside, requires_grad=True)
    expected = torch.tensor([1.0] * len(inside) + [0.0] * len(outside))

    output = fake_quantize(
        x, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), spec
    )
    output.backward(torch.ones_like(output))

    assert torch.equal(x.grad, expected)


def test_fake_quantize_gradient_scales_upstream() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    x = torch.tensor([[0.5, 50.0], [-0.5, -50.0]], requires_grad=True)
    scale = torch.tensor([0.1, 0.1])
    zero_point = torch.zeros(2, dtype=torch.int32)
    upstream = torch.tensor([[3.0, 4.0], [-2.0, 5.0]])

    fake_quantize(x, scale, zero_point, spec).backward(upstream)

    assert torch.equal(x.grad, torch.tensor([[3.0, 0.0], [-2.0, 0.0]]))
