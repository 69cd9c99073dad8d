"""Dynamic activation granularity: fast qparams, the config field and the QAT fake-quant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import (
    DYNAMIC_PER_TENSOR_SPEC,
    DYNAMIC_SPEC,
    STATIC_SPEC,
    dynamic_quantize,
    dynamic_spec,
    per_tensor_qparams,
)
from mono_quant.nn.fake_quant import FakeQuantize
from mono_quant.nn.qat import QATConv2d, QATLinear


def random_values(seed: int, count: int = 32) -> list[torch.Tensor]:
    """Return tensors that cover ordinary, one-signed, constant, tiny and huge ranges."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for index in range(count):
        exponent = float(torch.randint(-30, 30, (), generator=generator))
        x = torch.randn(5, 7, generator=generator) * 10**exponent
        values.append([x, x.abs(), -x.abs()][index % 3])
    values += [
        torch.zeros(4),
        torch.full((4,), 2.5),
        torch.tensor([3.4e38, -3.4e38]),
        torch.tensor([1e-45, -1e-45]),
        torch.zeros(0),
    ]
    return values


@pytest.mark.parametrize(
    "spec",
    [pytest.param(DYNAMIC_PER_TENSOR_SPEC, id="7bit"), pytest.param(STATIC_SPEC, id="8bit")],
)
def test_per_tensor_qparams_equal_choose_qparams(spec: QuantSpec) -> None:
    for x in random_values(seed=0):
        scale, zero_point = choose_qparams(*min_max(x, spec), spec)

        fast_scale, fast_zero_point = per_tensor_qparams(x, spec)

        assert fast_scale == float(scale), x
        assert fast_zero_point == int(zero_point), x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_per_tensor_qparams_half_input(dtype: torch.dtype) -> None:
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale, zero_point = choose_qparams(
        *min_max(x, DYNAMIC_PER_TENSOR_SPEC), DYNAMIC_PER_TENSOR_SPEC
    )

    fast_scale, fast_zero_point = per_tensor_qparams(x, DYNAMIC_PER_TENSOR_SPEC)

    assert fast_scale == float(scale)
    assert fast_zero_point == int(zero_point)


def test_per_tensor_qparams_non_finite() -> None:
    x = torch.tensor([1.0, math.inf])

    with pytest.raises(ValueError, match="infinite"):
        per_tensor_qparams(x, DYNAMIC_PER_TENSOR_SPEC)


@pytest.mark.parametrize(
    ("granularity", "expected"),
    [("per_tensor", DYNAMIC_PER_TENSOR_SPEC), ("per_token", DYNAMIC_SPEC)],
    ids=["per_tensor", "per_token"],
)
def test_dynamic_spec(granularity: str, expected: QuantSpec) -> None:
    assert dynamic_spec(granularity) == expected


def test_dynamic_spec_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="activation_granularity='per_channel' is not one of"):
        dynamic_spec("per_channel")


# ---------------------------------------------------------------------------------------------
# QuantConfig field


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "per_token"), ("per_tensor", "per_tensor"), ("per_token", "per_token")],
    ids=["auto", "per_tensor", "per_token"],
)
def test_config_activation_granularity(value: str, expected: str) -> None:
    config = QuantConfig.from_preset("w8a8-dynamic", activation_granularity=value)

    assert config.activation_granularity == expected
    assert config.to_dict()["activation_granularity"] == expected


def test_config_activation_granularity_invalid() -> None:
    with pytest.raises(ValueError, match="activation_granularity='per_row' is not one of"):
        QuantConfig(activation_granularity="per_row")


def test_config_per_token_weight_granularity_hint() -> None:
    with pytest.raises(ValueError, match="set activation_granularity='per_token'"):
        QuantConfig(granularity="per_token")


def test_config_round_trips_through_dict() -> None:
    config = QuantConfig.from_preset("w8a8-dynamic", activation_granularity="per_tensor")

    assert QuantConfig(**config.to_dict()) == config


# ---------------------------------------------------------------------------------------------
# QAT fake-quant of dynamic inputs


def qat_linear(granularity: str | None) -> QATLinear:
    linear = nn.Linear(16, 8)
    weight_quantizer = FakeQuantize(QuantSpec(bits=8, granularity="per_channel"), (8, 16))
    layer = QATLinear.from_float(linear, weight_quantizer, "dynamic")
    if granularity is not None:
        layer.activation_granularity = granularity
    return layer


@pytest.mark.parametrize(
    ("granularity", "spec"),
    [
        pytest.param(None, DYNAMIC_SPEC, id="default_per_token"),
        pytest.param("per_tensor", DYNAMIC_PER_TENSOR_SPEC, id="per_tensor"),
        pytest.param("per_token", DYNAMIC_SPEC, id="per_token"),
    ],
)
def test_qat_linear_dynamic_input(granularity: str | None, spec: QuantSpec) -> None:
    layer = qat_linear(granularity)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    x[0] *= 50

    rounded = layer.quantize_input(x)

    assert torch.equal(rounded, dynamic_quantize(x, spec))


def test_qat_conv_dynamic_input_stays_8bit_per_tensor() -> None:
    conv = nn.Conv2d(2, 4, 3)
    weight_quantizer = FakeQuantize(QuantSpec(bits=8, granularity="per_channel"), (4, 2, 3, 3))
    layer = QATConv2d.from_float(conv, weight_quantizer, "dynamic")
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))

    assert torch.equal(layer.quantize_input(x), dynamic_quantize(x, STATIC_SPEC))
