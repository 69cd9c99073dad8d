"""The dense path of QuantLinear: a kept float32 copy of small weights for small calls.

It must equal ``forward_reference`` bit for bit, because it multiplies the same dequantized
weight with the same rounded input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.core.kernels.dense import (
    DENSE_MAX_MACS,
    DENSE_MAX_WEIGHT,
    DENSE_WEIGHT_ONLY_MAX_MACS,
    dense_applies,
    weight_only_max_macs,
)
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.spec import QuantSpec
from mono_quant.nn import linear as linear_module
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.linear import DENSE, QuantLinear

SPECS = [
    pytest.param(QuantSpec(bits=8, granularity="per_channel"), id="int8_per_channel"),
    pytest.param(QuantSpec(bits=8, symmetric=False), id="uint8_per_tensor"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=32), id="int4_g32"),
    pytest.param(
        QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=16), id="uint3_g16"
    ),
]
# (activations, activation_granularity)
ACTIVATIONS = [
    pytest.param(None, "per_token", id="weight_only"),
    pytest.param("static", "per_token", id="static"),
    pytest.param("dynamic", "per_token", id="dynamic_per_token"),
    pytest.param("dynamic", "per_tensor", id="dynamic_per_tensor"),
]


def make_layer(
    spec: QuantSpec,
    activations: str | None,
    granularity: str = "per_token",
    in_features: int = 64,
    out_features: int = 48,
    seed: int = 0,
) -> QuantLinear:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.1)
        linear.bias.copy_(torch.randn(out_features, generator=generator))
    input_qparams = None
    if activations == "static":
        calibration = torch.randn(32, in_features, generator=generator)
        input_qparams = choose_qparams(*min_max(calibration, STATIC_SPEC), STATIC_SPEC)
    return QuantLinear.from_float(
        linear, spec, activations, input_qparams, activation_granularity=granularity
    )


def random_input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("activations", "granularity"), ACTIVATIONS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 3, 64)], ids=["rows1", "rows7", "3d"])
def test_dense_equals_reference(spec, activations, granularity, shape) -> None:
    layer = make_layer(spec, activations, granularity)
    x = random_input(shape)

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        output = layer(x)
        expected = layer.forward_reference(x)

    assert kernel == DENSE
    assert output.shape == (*shape[:-1], 48)
    assert torch.equal(output, expected)


def test_dense_without_bias_equals_reference() -> None:
    linear = nn.Linear(32, 16, bias=False)
    layer = QuantLinear.from_float(linear, QuantSpec(bits=8, granularity="per_channel"))
    x = random_input((3, 32))

    with torch.no_grad():
        assert layer.kernel_for(x) == DENSE
        assert torch.equal(layer(x), layer.forward_reference(x))


def test_dense_constant_and_zero_rows() -> None:
    # A constant row and an all-zero row have a zero range: the scale is clamped to its minimum.
    layer = make_layer(QuantSpec(bits=8, granularity="per_channel"), "dynamic")
    x = random_input((4, 64))
    x[1] = 3.0
    x[2] = 0.0

    with torch.no_grad():
        assert torch.equal(layer(x), layer.forward_reference(x))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_dense_non_finite_input_error(value: float) -> None:
    layer = make_layer(QuantSpec(bits=8, granularity="per_channel"), "dynamic")
    x = random_input((2, 64))
    x[1, 5] = value

    with torch.no_grad(), pytest.raises(ValueError) as fast_error:
        layer(x)
    with torch.no_grad(), pytest.raises(ValueError) as reference_error:
        layer.forward_reference(x)

    # The same check fails on both paths; the layer's own call adds its name and the fix.
    assert str(fast_error.value.__cause__) == str(reference_error.value)
    assert str(fast_error.value).startswith(f"the input of {layer.describe()}")
    assert "overrides=" in str(fast_error.value)


def test_dense_huge_values_capped() -> None:
    # Past about 1e38 the reference caps the scale; the dense path hands such rows to it.
    layer = make_layer(QuantSpec(bits=8, granularity="per_channel"), "dynamic")
    x = random_input((2, 64))
    x[0, 0] = 3e38
    x[0, 1] = -3e38

    with torch.no_grad():
        output = layer(x)
        expected = layer.forward_reference(x)

    assert torch.equal(output, expected)


def test_dense_copy_follows_load_state_dict() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    layer = make_layer(spec, "static", seed=0)
    other = make_layer(spec, "static", seed=1)
    x = random_input((2, 64))

    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        after = layer(x)

    assert not torch.equal(before, after)
    assert torch.equal(after, other.forward_reference(x))


def test_dense_limits_choose_other_paths() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    # 256 * 256 weights sit at the weight limit. 7 rows stay within the MAC limit, 8 pass it.
    at_limit = make_layer(spec, "static", in_features=256, out_features=256)
    over_weight = make_layer(spec, "static", in_features=256, out_features=257)
    rows_at_mac_limit = DENSE_MAX_MACS // (256 * 256)

    assert DENSE_MAX_WEIGHT == 256 * 256
    assert at_limit.kernel_for(random_input((rows_at_mac_limit, 256))) == DENSE
    assert at_limit.kernel_for(random_input((rows_at_mac_limit + 1, 256))) != DENSE
    assert over_weight.kernel_for(random_input((1, 256))) != DENSE


def test_dense_applies_bounds() -> None:
    assert dense_applies(DENSE_MAX_WEIGHT, DENSE_MAX_MACS)
    assert not dense_applies(DENSE_MAX_WEIGHT + 1, 1)
    assert not dense_applies(1, DENSE_MAX_MACS + 1)
    assert dense_applies(DENSE_MAX_WEIGHT, DENSE_WEIGHT_ONLY_MAX_MACS, weight_only_max_macs(True))
    assert not dense_applies(1, DENSE_WEIGHT_ONLY_MAX_MACS + 1, weight_only_max_macs(True))
    assert dense_applies(DENSE_MAX_WEIGHT, 2**40, weight_only_max_macs(False))
    assert not dense_applies(DENSE_MAX_WEIGHT + 1, 1, weight_only_max_macs(False))


@pytest.mark.parametrize("native_bfloat16", [True, False], ids=["native_bf16", "no_native_bf16"])
def test_weight_only_dense_large_calls(
    native_bfloat16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # For weight-only layers the copy runs the float model's own kernel, so it keeps calls far
    # past DENSE_MAX_MACS; only the bfloat16 workspace takes the largest ones.
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: native_bfloat16)
    layer = make_layer(
        QuantSpec(bits=8, granularity="per_channel"), None, in_features=256, out_features=256
    )
    rows_at_limit = DENSE_WEIGHT_ONLY_MAX_MACS // (256 * 256)
    x_at_limit = random_input((rows_at_limit, 256))
    x_over = random_input((rows_at_limit + 1, 256))

    assert rows_at_limit * 256 * 256 > DENSE_MAX_MACS
    assert layer.kernel_for(x_at_limit) == DENSE
    assert layer.kernel_for(x_over) == (linear_module.BF16_WORKSPACE if native_bfloat16 else DENSE)
    assert torch.equal(layer(x_at_limit), layer.forward_reference(x_at_limit))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dense_is_float32_only(dtype: torch.dtype) -> None:
    layer = make_layer(QuantSpec(bits=8, granularity="per_channel"), "static")
    x = random_input((2, 64)).to(dtype)

    assert layer.kernel_for(x) != DENSE


def test_dense_skipped_for_input_grad() -> None:
    layer = make_layer(QuantSpec(bits=8, granularity="per_channel"), None)
    x = random_input((2, 64)).requires_grad_()

    layer(x).sum().backward()
    expected = torch.autograd.grad(layer.forward_reference(x).sum(), x)[0]

    assert layer.kernel_for(x) != DENSE
    assert torch.equal(x.grad, expected)


def test_non_finite_input_error_names_model_layer() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantized = mq.quantize(model, "w8a8-dynamic")
    x = random_input((2, 64))
    x[0, 0] = float("nan")

    with torch.no_grad(), pytest.raises(ValueError) as error:
        quantized(x)

    message = str(error.value)
    assert message.startswith("the input of QuantLinear '0' has no finite range to quantize")
    assert "min_val contains 1 NaN" in message
    assert "QuantConfig(overrides={'0': None})" in message
