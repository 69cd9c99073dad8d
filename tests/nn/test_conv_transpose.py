"""Tests for QuantConvTranspose1d/2d/3d against float transposed convolutions."""

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
from mono_quant.nn.conv_transpose import (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)

QUANTIZED_TYPES = {
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}
INT8_OUTPUT_CHANNELS = QuantSpec(bits=8, granularity="per_channel", axis=1)

# (transposed conv type, constructor keyword arguments, input shape)
CASES = [
    pytest.param(nn.ConvTranspose1d, {"kernel_size": 3}, (2, 4, 9), id="1d"),
    pytest.param(
        nn.ConvTranspose1d,
        {"kernel_size": 4, "stride": 2, "padding": 1, "output_padding": 1, "bias": False},
        (2, 4, 9),
        id="1d_stride2_output_padding",
    ),
    pytest.param(nn.ConvTranspose2d, {"kernel_size": 3, "padding": 1}, (2, 4, 6, 6), id="2d"),
    pytest.param(
        nn.ConvTranspose2d,
        {"kernel_size": 3, "stride": 2, "dilation": 2, "groups": 2},
        (2, 4, 5, 5),
        id="2d_groups2_stride2_dilation2",
    ),
    pytest.param(
        nn.ConvTranspose2d,
        {"kernel_size": 3, "groups": 4, "padding": 1, "out_channels": 4},
        (2, 4, 6, 6),
        id="2d_depthwise",
    ),
    pytest.param(
        nn.ConvTranspose3d, {"kernel_size": 2, "stride": 2}, (1, 4, 3, 3, 3), id="3d_stride2"
    ),
]
SPECS = [
    pytest.param(INT8_OUTPUT_CHANNELS, id="int8_per_channel"),
    pytest.param(
        QuantSpec(bits=8, symmetric=False, granularity="per_tensor"), id="uint8_per_tensor"
    ),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=8), id="int4_g8"),
]


def float_conv(conv_type: type[nn.Module], kwargs: dict, seed: int) -> nn.Module:
    arguments = {"in_channels": 4, "out_channels": 6, **kwargs}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return conv_type(**arguments)


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def with_weight(conv: nn.Module, weight: torch.Tensor) -> nn.Module:
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(weight)
    return reference


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CASES)
def test_conv_transpose_matches_dequantized_float(conv_type, kwargs, shape, spec) -> None:
    conv = float_conv(conv_type, kwargs, seed=0)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, spec)
    x = random_input(shape, seed=1)

    output = layer(x)
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(x)

    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CASES)
def test_conv_transpose_scales_follow_dim1(conv_type, kwargs, shape) -> None:
    conv = float_conv(conv_type, kwargs, seed=2)
    # The config's default spec (axis 0) is moved to the output-channel axis 1.
    layer = QUANTIZED_TYPES[conv_type].from_float(
        conv, QuantSpec(bits=8, granularity="per_channel")
    )

    weight = conv.weight.detach()
    error = to_blocks((layer.dequantized_weight() - weight).abs(), INT8_OUTPUT_CHANNELS)
    bound = layer.weight_scale.unsqueeze(-1) / 2 * (1 + 1e-5)
    bound = bound + to_blocks(weight.abs(), INT8_OUTPUT_CHANNELS) * torch.finfo(torch.float32).eps

    assert layer.weight_spec.axis == 1
    assert layer.weight_scale.shape == (weight.shape[1],)
    assert bool((error <= bound).all())


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = float((reference - output).double().square().sum())
    return 10 * math.log10(float(reference.double().square().sum()) / noise)


@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), CASES)
def test_conv_transpose_int8_sqnr(conv_type, kwargs, shape) -> None:
    conv = float_conv(conv_type, kwargs, seed=3)
    layer = QUANTIZED_TYPES[conv_type].from_float(conv, INT8_OUTPUT_CHANNELS)
    x = random_input(shape, seed=4)

    with torch.no_grad():
        expected = conv(x)

    assert sqnr_db(expected, layer(x)) >= 30.0


def test_conv_transpose_output_size() -> None:
    conv = float_conv(nn.ConvTranspose2d, {"kernel_size": 3, "stride": 2, "padding": 1}, seed=5)
    layer = QuantConvTranspose2d.from_float(conv, INT8_OUTPUT_CHANNELS)
    x = random_input((1, 4, 5, 5), seed=6)

    output = layer(x, output_size=[10, 10])
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(x, output_size=[10, 10])

    assert output.shape == (1, 6, 10, 10)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_static_rounds_input() -> None:
    conv = float_conv(nn.ConvTranspose1d, {"kernel_size": 3}, seed=7)
    calibration = random_input((4, 4, 9), seed=8)
    input_qparams = choose_qparams(*min_max(calibration, STATIC_SPEC), STATIC_SPEC)
    layer = QuantConvTranspose1d.from_float(conv, INT8_OUTPUT_CHANNELS, "static", input_qparams)
    x = random_input((2, 4, 9), seed=9)

    scale, zero_point = input_qparams
    rounded = (torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point) * scale
    with torch.no_grad():
        expected = with_weight(conv, layer.dequantized_weight())(rounded)

    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_state_dict_round_trip() -> None:
    kwargs = {"kernel_size": 3, "groups": 2}
    layer = QuantConvTranspose2d.from_float(
        float_conv(nn.ConvTranspose2d, kwargs, seed=10), INT8_OUTPUT_CHANNELS
    )
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = QuantConvTranspose2d.from_float(
        float_conv(nn.ConvTranspose2d, kwargs, seed=11), INT8_OUTPUT_CHANNELS
    )
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x = random_input((1, 4, 5, 5), seed=12)

    assert torch.equal(rebuilt(x), layer(x))


def test_conv_transpose_rejects_other_type() -> None:
    with pytest.raises(TypeError, match="expects ConvTranspose2d, got Conv2d"):
        QuantConvTranspose2d.from_float(nn.Conv2d(2, 2, 3), INT8_OUTPUT_CHANNELS)
