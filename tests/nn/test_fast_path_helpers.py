"""Shared fast-path helpers against the reference quantization functions they replace."""

from __future__ import annotations

import threading

import pytest
import torch

from mono_quant.core.fastpath import (
    dequantize_factors,
    dequantize_into,
    dequantize_into_supported,
    per_row_qparams,
    per_tensor_qparams,
    quantize_codes,
    release_workspaces,
    round_to_grid,
    static_input_grid,
    workspace,
)
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import DYNAMIC_SPEC, STATIC_SPEC, quantize_dequantize


def _tensor(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if name == "normal":
        return torch.randn(64, 33, generator=generator)
    if name == "positive":
        return torch.rand(64, 33, generator=generator) * 7
    if name == "negative":
        return -torch.rand(64, 33, generator=generator) * 1e-3
    if name == "zeros":
        return torch.zeros(64, 33)
    if name == "constant":
        return torch.full((64, 33), 2.5)
    if name == "wide":
        return torch.randn(64, 33, generator=generator) * 1e30
    if name == "huge":
        # A range beyond float32's maximum, where choose_qparams caps the scale.
        return torch.tensor([[-3e38, 3e38, 1.0], [2.0, -1e38, 0.0]])
    if name == "ties":
        # Multiples of half a step at scale 1/255 put many values on rounding ties.
        return torch.arange(-300, 700, dtype=torch.float32).reshape(40, 25) / 510
    raise ValueError(name)


TENSORS = ["normal", "positive", "negative", "zeros", "constant", "wide", "huge", "ties"]
ACTIVATION_SPECS = [
    pytest.param(STATIC_SPEC, id="uint8"),
    pytest.param(QuantSpec(bits=7, symmetric=False, granularity="per_tensor"), id="uint7"),
]


@pytest.mark.parametrize("spec", ACTIVATION_SPECS)
@pytest.mark.parametrize("name", TENSORS)
def test_per_tensor_qparams_equal_choose_qparams(name: str, spec: QuantSpec) -> None:
    x = _tensor(name)
    expected_scale, expected_zero_point = choose_qparams(*min_max(x, spec), spec)

    scale, zero_point = per_tensor_qparams(x, spec)

    assert scale == float(expected_scale)
    assert zero_point == int(expected_zero_point)


def test_per_tensor_qparams_empty_tensor() -> None:
    x = torch.empty(0, 4)
    expected_scale, expected_zero_point = choose_qparams(*min_max(x, STATIC_SPEC), STATIC_SPEC)

    assert per_tensor_qparams(x, STATIC_SPEC) == (
        float(expected_scale),
        int(expected_zero_point),
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_per_tensor_qparams_rejects_non_finite(value: float) -> None:
    x = torch.ones(8)
    x[3] = value

    with pytest.raises(ValueError, match="NaN"):
        per_tensor_qparams(x, STATIC_SPEC)


def test_per_tensor_qparams_rejects_symmetric_spec() -> None:
    with pytest.raises(ValueError, match="affine"):
        per_tensor_qparams(torch.ones(4), QuantSpec(bits=8, symmetric=True))


# per_row_qparams skips the overflow cap, so it is exact only up to ROW_QPARAMS_MAX_ABS.
@pytest.mark.parametrize("name", [name for name in TENSORS if name != "huge"])
def test_per_row_qparams_equal_choose_qparams(name: str) -> None:
    x = _tensor(name)
    expected_scale, expected_zero_point = choose_qparams(*min_max(x, DYNAMIC_SPEC), DYNAMIC_SPEC)

    scale, zero_point = per_row_qparams(x, DYNAMIC_SPEC)

    assert torch.equal(scale.squeeze(1), expected_scale)
    assert torch.equal(zero_point.squeeze(1), expected_zero_point.float())


def test_quantize_codes_equal_quantize() -> None:
    x = _tensor("ties") * 3 - 0.2
    scale, zero_point = choose_qparams(*min_max(x, DYNAMIC_SPEC), DYNAMIC_SPEC)

    codes = quantize_codes(x, scale.unsqueeze(1), zero_point.unsqueeze(1).float(), DYNAMIC_SPEC)

    assert torch.equal(codes, quantize(x, scale, zero_point, DYNAMIC_SPEC).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["normal", "positive", "ties"])
def test_round_to_grid_equals_quantize_dequantize(name: str, dtype: torch.dtype) -> None:
    x = _tensor(name).to(dtype)
    scale, zero_point = choose_qparams(*min_max(x, STATIC_SPEC), STATIC_SPEC)
    expected = quantize_dequantize(x, scale, zero_point, STATIC_SPEC)

    with_numbers = round_to_grid(
        x, float(scale), float(-zero_point), float(STATIC_SPEC.quant_max - zero_point)
    )
    grid_scale, _, low, high = static_input_grid(scale, zero_point, STATIC_SPEC)
    with_tensors = round_to_grid(x, grid_scale, low, high)

    assert with_numbers.dtype == dtype
    assert torch.equal(with_numbers, expected)
    assert torch.equal(with_tensors, expected)


def test_round_to_grid_returns_new_tensor() -> None:
    x = torch.rand(4, 4)
    before = x.clone()

    output = round_to_grid(x, 0.1, 0.0, 255.0)

    assert output.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


WEIGHT_CASES = [
    pytest.param(QuantSpec(bits=8), (6, 4, 3, 3), id="int8_per_tensor"),
    pytest.param(QuantSpec(bits=8, granularity="per_channel"), (6, 4, 3, 3), id="int8_axis0"),
    pytest.param(QuantSpec(bits=8, granularity="per_channel", axis=1), (6, 4, 3), id="int8_axis1"),
    pytest.param(
        QuantSpec(bits=8, symmetric=False, granularity="per_channel"),
        (5, 7),
        id="uint8_axis0",
    ),
    pytest.param(QuantSpec(bits=8, symmetric=False), (5, 7), id="uint8_per_tensor"),
    pytest.param(
        QuantSpec(bits=8, granularity="per_group", group_size=9), (4, 2, 3, 3), id="int8_g9"
    ),
    pytest.param(
        QuantSpec(bits=8, symmetric=False, granularity="per_group", group_size=4),
        (3, 8),
        id="uint8_g4",
    ),
]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize(("spec", "shape"), WEIGHT_CASES)
def test_dequantize_into_equals_dequantize(
    spec: QuantSpec, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    scale, zero_point = choose_qparams(*min_max(weight, spec), spec)
    codes = quantize(weight, scale, zero_point, spec)
    stored_zero_point = None if spec.symmetric else zero_point

    factors = dequantize_factors(scale, stored_zero_point, spec, shape)
    output = dequantize_into(torch.empty(shape, dtype=dtype), codes, *factors)

    assert dequantize_into_supported(spec, shape)
    assert torch.equal(output, dequantize(codes, scale, zero_point, spec, dtype))


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=8), (4, 16), id="4bit"),
        pytest.param(
            QuantSpec(bits=8, granularity="per_group", group_size=5), (4, 16), id="ragged_group"
        ),
    ],
)
def test_dequantize_into_supported_rejects(spec: QuantSpec, shape: tuple[int, ...]) -> None:
    assert not dequantize_into_supported(spec, shape)


def test_workspace_reuses_and_grows() -> None:
    release_workspaces()
    device = torch.device("cpu")

    small = workspace((2, 3), torch.float32, device)
    again = workspace((2, 3), torch.float32, device)
    other_shape = workspace((3, 2), torch.float32, device)
    larger = workspace((10, 10), torch.float32, device)

    assert again is small
    assert other_shape.data_ptr() == small.data_ptr()
    assert larger.numel() == 100
    assert workspace((2, 3), torch.float32, device).data_ptr() == larger.data_ptr()
    release_workspaces()


def test_workspace_is_per_thread() -> None:
    device = torch.device("cpu")
    pointers = []

    def take() -> None:
        pointers.append(workspace((64,), torch.float32, device).data_ptr())

    take()
    thread = threading.Thread(target=take)
    thread.start()
    thread.join()

    assert pointers[0] != pointers[1]


def test_workspace_writable_outside_inference_mode() -> None:
    release_workspaces()
    device = torch.device("cpu")
    with torch.inference_mode():
        workspace((8,), torch.float32, device)

    buffer = workspace((8,), torch.float32, device)
    buffer.fill_(1.0)

    assert float(buffer.sum()) == 8.0
    release_workspaces()
