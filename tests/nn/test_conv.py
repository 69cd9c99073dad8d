"""Tests for QuantConv1d/2d/3d against float convolutions with the dequantized weight."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from mono_quant.core.layout import to_blocks
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d

FLOAT32_EPS = torch.finfo(torch.float32).eps
INT8_PER_CHANNEL = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
QUANTIZED_TYPES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}

# (conv type, constructor keyword arguments, input shape)
CONV_CASES = [
    pytest.param(
        nn.Conv1d, {"in_channels": 4, "out_channels": 8, "kernel_size": 3}, (2, 4, 20), id="1d"
    ),
    pytest.param(
        nn.Conv1d,
        {
            "in_channels": 4,
            "out_channels": 8,
            "kernel_size": 5,
            "stride": 2,
            "dilation": 2,
            "padding": 4,
            "padding_mode": "circular",
            "bias": False,
        },
        (2, 4, 30),
        id="1d_stride2_dilation2_circular_no_bias",
    ),
    pytest.param(
        nn.Conv2d,
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1},
        (2, 4, 10, 10),
        id="2d",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 4,
            "out_channels": 8,
            "kernel_size": 3,
            "groups": 2,
            "padding": 1,
            "padding_mode": "reflect",
        },
        (2, 4, 9, 11),
        id="2d_groups2_reflect",
    ),
    pytest.param(
        nn.Conv2d,
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 8, "padding": 1},
        (2, 8, 12, 12),
        id="2d_depthwise",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": 3,
            "stride": 2,
            "dilation": 2,
            "bias": False,
        },
        (2, 4, 15, 15),
        id="2d_stride2_dilation2_no_bias",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": (3, 2),
            "padding": "same",
            "padding_mode": "reflect",
        },
        (1, 4, 9, 9),
        id="2d_same_reflect",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 4,
            "out_channels": 8,
            "kernel_size": 3,
            "padding": 2,
            "padding_mode": "circular",
        },
        (1, 4, 8, 8),
        id="2d_circular",
    ),
    pytest.param(
        nn.Conv3d,
        {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1},
        (1, 2, 6, 6, 6),
        id="3d",
    ),
    pytest.param(
        nn.Conv3d,
        {
            "in_channels": 4,
            "out_channels": 4,
            "kernel_size": 3,
            "groups": 2,
            "stride": 2,
            "padding": 1,
            "padding_mode": "circular",
        },
        (1, 4, 7, 7, 7),
        id="3d_groups2_stride2_circular",
    ),
]

WEIGHT_SPECS = [
    pytest.param(INT8_PER_CHANNEL, id="int8_per_channel"),
    pytest.param(
        QuantSpec(bits=8, symmetric=False, granularity="per_tensor"), id="uint8_per_tensor"
    ),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=8), id="int4_g8"),
]


def float_conv(conv_type: type[nn.Module], kwargs: dict, seed: int) -> nn.Module:
    """Build a float convolution with torch's default init under a fixed seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return conv_type(**kwargs)


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def with_weight(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Return a copy of ``conv`` with ``weight``, so that torch itself applies the padding mode."""
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(weight)
    return reference


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    signal = float(reference.double().square().sum())
    noise = float((reference.double() - output.double()).square().sum())
    return 10 * math.log10(signal / noise)


def per_tensor_reference(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` onto one affine uint8 grid spanning its own range widened to include 0."""
    min_neg = torch.clamp(x.min(), max=0.0)
    max_pos = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp(max_pos / 255.0 - min_neg / 255.0, min=FLOAT32_EPS)
    zero_point = torch.clamp(-torch.round(min_neg / scale), 0, 255)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return (codes - zero_point) * scale


@pytest.mark.parametrize("spec", WEIGHT_SPECS)
@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CONV_CASES)
def test_conv_matches_dequantized_float_conv(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...], spec: QuantSpec
) -> None:
    conv = float_conv(conv_type, kwargs, seed=0)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, spec)
    x = random_input(shape, seed=1)

    output = layer(x)
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(x)

    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CONV_CASES)
def test_conv_int8_sqnr(conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...]) -> None:
    conv = float_conv(conv_type, kwargs, seed=2)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, INT8_PER_CHANNEL)
    x = random_input(shape, seed=3)

    with torch.no_grad():
        reference = conv(x)
    measured = sqnr_db(reference, layer(x))

    assert measured >= 30.0, f"output SQNR {measured:.2f} dB is below 30 dB"


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CONV_CASES)
def test_conv_weight_error_within_half_step(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...]
) -> None:
    conv = float_conv(conv_type, kwargs, seed=4)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, INT8_PER_CHANNEL)

    weight = conv.weight.detach()
    error = to_blocks((layer.dequantized_weight() - weight).abs(), INT8_PER_CHANNEL)
    bound = layer.weight_scale.unsqueeze(-1) / 2 * (1 + 1e-5)
    bound = bound + to_blocks(weight.abs(), INT8_PER_CHANNEL) * FLOAT32_EPS / 2
    assert layer.weight_scale.shape == (weight.shape[0],)
    assert bool((error <= bound).all())


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CONV_CASES)
def test_conv_copies_hyperparameters(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...]
) -> None:
    conv = float_conv(conv_type, kwargs, seed=5)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, INT8_PER_CHANNEL)

    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding"):
        assert getattr(layer, name) == getattr(conv, name), name
    for name in ("dilation", "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert (layer.bias is None) == (conv.bias is None)


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CONV_CASES)
def test_conv_dynamic_per_tensor(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...]
) -> None:
    conv = float_conv(conv_type, kwargs, seed=6)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, INT8_PER_CHANNEL, activations="dynamic")
    x = random_input(shape, seed=7)

    output = layer(x)
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(per_tensor_reference(x))

    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_conv_static_rounds_input() -> None:
    kwargs = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1}
    conv = float_conv(nn.Conv2d, kwargs, seed=8)
    calibration = random_input((4, 4, 8, 8), seed=9)
    input_qparams = choose_qparams(*min_max(calibration, STATIC_SPEC), STATIC_SPEC)
    layer = QuantConv2d.from_float(conv, INT8_PER_CHANNEL, "static", input_qparams)
    x = random_input((2, 4, 8, 8), seed=10) * 1.5

    output = layer(x)
    scale, zero_point = input_qparams
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    rounded = (codes - zero_point) * scale
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(rounded)

    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("quantized_type", "module", "match"),
    [
        pytest.param(
            QuantConv2d,
            nn.Conv1d(2, 2, 3),
            "QuantConv2d.from_float expects Conv2d, got Conv1d",
            id="1d_as_2d",
        ),
        pytest.param(
            QuantConv1d,
            nn.Conv3d(2, 2, 3),
            "QuantConv1d.from_float expects Conv1d, got Conv3d",
            id="3d_as_1d",
        ),
        pytest.param(
            QuantConv3d,
            nn.Linear(2, 2),
            "QuantConv3d.from_float expects Conv3d, got Linear",
            id="linear_as_3d",
        ),
        pytest.param(
            QuantConv2d,
            nn.ConvTranspose2d(2, 2, 3),
            "expects Conv2d, got ConvTranspose2d",
            id="transposed_as_2d",
        ),
    ],
)
def test_conv_from_float_rejects_type(quantized_type, module: nn.Module, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        quantized_type.from_float(module, INT8_PER_CHANNEL)


def test_conv_state_dict_round_trip() -> None:
    kwargs = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "groups": 2}
    spec = QuantSpec(bits=4, granularity="per_group", group_size=8)
    source = QuantConv2d.from_float(float_conv(nn.Conv2d, kwargs, seed=11), spec)
    target = QuantConv2d.from_float(float_conv(nn.Conv2d, kwargs, seed=12), spec)
    buffer = io.BytesIO()

    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)

    x = random_input((1, 4, 6, 6), seed=13)
    assert target.state_dict()["_extra_state"]["weight_shape"] == [8, 2, 3, 3]
    assert torch.equal(target(x), source(x))
