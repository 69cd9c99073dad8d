"""Fast paths of the quantized convolutions against their ``forward_reference``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant.nn.conv as conv_module
from mono_quant.core import conv_kernels
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from mono_quant.nn.conv_transpose import (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)

FLOAT32_EPS = torch.finfo(torch.float32).eps
INT8_PER_CHANNEL = QuantSpec(bits=8, granularity="per_channel")
QUANTIZED_TYPES = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}
INPUT_QPARAMS = (torch.tensor(0.02), torch.tensor(100, dtype=torch.int32))
needs_int8 = pytest.mark.skipif(
    not conv_kernels.int8_conv_available(2),
    reason="the oneDNN int8 convolution needs a VNNI CPU and passes its self-check only there",
)


def _layer(
    conv_type: type[nn.Module],
    kwargs: dict,
    spec: QuantSpec = INT8_PER_CHANNEL,
    activations: str | None = None,
    seed: int = 0,
) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        conv = conv_type(**kwargs)
    quantized_type = QUANTIZED_TYPES[conv_type]
    input_qparams = INPUT_QPARAMS if activations == "static" else None
    return quantized_type.from_float(
        conv, quantized_type.layer_spec(spec), activations, input_qparams
    )


def _input(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def no_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the small test weights to the workspace path instead of the dense one."""
    monkeypatch.setattr(conv_module, "DENSE_MAX_WEIGHT", 0)


# ---- workspace path: bit-identical to the reference ----------------------------------------

# (conv type, constructor keyword arguments, input shape); every input is small enough to stay
# below the int8 kernel's size threshold.
WORKSPACE_CASES = [
    pytest.param(
        nn.Conv1d, {"in_channels": 4, "out_channels": 6, "kernel_size": 3}, (2, 4, 9), id="1d"
    ),
    pytest.param(
        nn.Conv2d,
        {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1},
        (2, 4, 8, 8),
        id="2d",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": (3, 2),
            "padding": "same",
            "padding_mode": "reflect",
            "bias": False,
        },
        (1, 4, 7, 7),
        id="2d_same_reflect_no_bias",
    ),
    pytest.param(
        nn.Conv2d,
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 8, "stride": 2},
        (2, 8, 9, 9),
        id="2d_depthwise_stride2",
    ),
    pytest.param(
        nn.Conv3d,
        {"in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1, "dilation": 2},
        (1, 2, 6, 6, 6),
        id="3d_dilation2",
    ),
    pytest.param(
        nn.ConvTranspose2d,
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2},
        (2, 4, 5, 5),
        id="transpose2d_stride2",
    ),
    pytest.param(
        nn.ConvTranspose1d,
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 2, "bias": False},
        (2, 4, 7),
        id="transpose1d_groups2",
    ),
    pytest.param(
        nn.ConvTranspose3d,
        {"in_channels": 2, "out_channels": 3, "kernel_size": 2},
        (1, 2, 3, 3, 3),
        id="transpose3d",
    ),
]
WORKSPACE_SPECS = [
    pytest.param(INT8_PER_CHANNEL, id="int8_per_channel"),
    pytest.param(QuantSpec(bits=8, symmetric=False), id="uint8_per_tensor"),
    pytest.param(
        QuantSpec(bits=8, symmetric=False, granularity="per_group", group_size=3), id="uint8_g3"
    ),
]


@pytest.mark.parametrize("activations", [None, "static", "dynamic"])
@pytest.mark.parametrize("spec", WORKSPACE_SPECS)
@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), WORKSPACE_CASES)
def test_workspace_path_equals_reference(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...], spec, activations, no_dense
) -> None:
    check_path_equals_reference(
        _layer(conv_type, kwargs, spec, activations), _input(shape), "workspace"
    )


def check_path_equals_reference(layer: nn.Module, x: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        kernel = layer.kernel_for(x)
        output = layer(x)
        expected = layer.forward_reference(x)

    assert kernel == path
    assert torch.equal(output, expected)


# Transposed convolutions have no dense path.
DENSE_CASES = [case for case in WORKSPACE_CASES if "transpose" not in case.id]
DENSE_SPECS = [
    *WORKSPACE_SPECS,
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=4), id="int4_g4"),
    pytest.param(QuantSpec(bits=3, symmetric=False), id="uint3_per_tensor"),
]


@pytest.mark.parametrize("activations", [None, "static", "dynamic"])
@pytest.mark.parametrize("spec", DENSE_SPECS)
@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), DENSE_CASES)
def test_dense_path_equals_reference(
    conv_type: type[nn.Module], kwargs: dict, shape: tuple[int, ...], spec, activations
) -> None:
    check_path_equals_reference(
        _layer(conv_type, kwargs, spec, activations), _input(shape), "dense"
    )


def test_dense_copy_follows_new_weights() -> None:
    kwargs = {"in_channels": 4, "out_channels": 4, "kernel_size": 3}
    layer = _layer(nn.Conv2d, kwargs, activations="static", seed=0)
    other = _layer(nn.Conv2d, kwargs, activations="static", seed=1)
    x = _input((1, 4, 6, 6))

    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        after = layer(x)

    assert layer.kernel_for(x) == "dense"
    assert not torch.equal(before, after)
    assert torch.equal(after, other.forward_reference(x))


def test_dense_limit_sends_large_weights_to_workspace() -> None:
    limit = conv_module.DENSE_MAX_WEIGHT
    # 64 * 64 * 4 * 4 = 65536 weights sit at the limit; one more output channel passes it.
    at_limit = _layer(nn.Conv2d, {"in_channels": 64, "out_channels": 64, "kernel_size": 4})
    over = _layer(nn.Conv2d, {"in_channels": 64, "out_channels": 65, "kernel_size": 4})
    x = _input((1, 64, 4, 4))

    assert at_limit.weight_codes.numel() == limit
    assert at_limit.kernel_for(x) == "dense"
    assert over.kernel_for(x) == "workspace"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_workspace_path_half_dtypes(dtype: torch.dtype) -> None:
    kwargs = {"in_channels": 4, "out_channels": 8, "kernel_size": 3, "padding": 1}
    layer = _layer(nn.Conv2d, kwargs, activations="static")
    x = _input((2, 4, 6, 6)).to(dtype)

    with torch.no_grad():
        output = layer(x)
        expected = layer.forward_reference(x)

    assert layer.kernel_for(x) == "workspace"
    assert output.dtype == dtype
    assert torch.equal(output, expected)


def test_workspace_path_unbatched_input() -> None:
    layer = _layer(
        nn.Conv2d, {"in_channels": 3, "out_channels": 4, "kernel_size": 3}, activations="dynamic"
    )
    x = _input((3, 6, 6))

    with torch.no_grad():
        assert torch.equal(layer(x), layer.forward_reference(x))


def test_workspace_shared_by_layers(no_dense) -> None:
    first = _layer(nn.Conv2d, {"in_channels": 2, "out_channels": 4, "kernel_size": 3}, seed=0)
    second = _layer(nn.Conv2d, {"in_channels": 2, "out_channels": 4, "kernel_size": 3}, seed=1)
    x = _input((1, 2, 5, 5))

    with torch.no_grad():
        outputs = [first(x), second(x), first(x)]
        expected = [first.forward_reference(x), second.forward_reference(x)]

    assert torch.equal(outputs[0], expected[0])
    assert torch.equal(outputs[1], expected[1])
    assert torch.equal(outputs[2], expected[0])


# ---- paths that fall back to the reference -------------------------------------------------


def test_reference_switch_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(
        nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 3}, activations="static"
    )
    x = _input((1, 4, 6, 6))
    monkeypatch.setenv("MONO_QUANT_KERNELS", "reference")

    assert layer.kernel_for(x) == "reference"
    with torch.no_grad():
        assert torch.equal(layer(x), layer.forward_reference(x))


@pytest.mark.parametrize(
    ("spec", "dtype"),
    [
        pytest.param(
            QuantSpec(bits=4, granularity="per_group", group_size=4), torch.float32, id="int4"
        ),
        pytest.param(INT8_PER_CHANNEL, torch.float64, id="float64"),
    ],
)
def test_unsupported_inputs_take_reference(spec: QuantSpec, dtype: torch.dtype, no_dense) -> None:
    layer = _layer(nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 3}, spec)
    x = _input((1, 4, 6, 6)).to(dtype)

    assert layer.kernel_for(x) == "reference"


def test_autograd_input_takes_reference() -> None:
    # A float convolution saves its weight for the backward pass, so the shared workspace
    # would be overwritten before the gradient is computed.
    layer = _layer(nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 3})
    x = _input((1, 4, 6, 6)).requires_grad_()

    layer(x).sum().backward()
    expected = torch.autograd.grad(layer.forward_reference(x).sum(), x)[0]

    assert layer.kernel_for(x) == "reference"
    assert torch.equal(x.grad, expected)


# ---- buffers that change after the first call ----------------------------------------------


def test_load_state_dict_updates_fast_path() -> None:
    kwargs = {"in_channels": 4, "out_channels": 4, "kernel_size": 3}
    layer = _layer(nn.Conv2d, kwargs, activations="static", seed=0)
    other = _layer(nn.Conv2d, kwargs, activations="static", seed=1)
    with torch.no_grad():
        other.input_scale.fill_(0.05)
    x = _input((1, 4, 6, 6))

    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        output = layer(x)

    assert torch.equal(output, other.forward_reference(x))


def test_in_place_scale_change_updates_fast_path() -> None:
    layer = _layer(nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 3})
    x = _input((1, 4, 6, 6))

    with torch.no_grad():
        before = layer(x)
        layer.weight_scale.mul_(2)
        after = layer(x)

    assert torch.equal(after, layer.forward_reference(x))
    assert not torch.equal(after, before)


def test_deepcopy_after_fast_call() -> None:
    layer = _layer(
        nn.Conv2d, {"in_channels": 4, "out_channels": 4, "kernel_size": 3}, activations="static"
    )
    x = _input((1, 4, 6, 6))
    with torch.no_grad():
        layer(x)

    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.weight_scale.mul_(2)

        assert torch.equal(copied(x), copied.forward_reference(x))
        assert torch.equal(layer(x), layer.forward_reference(x))


# ---- int8 path: the same integer codes, float rounding only --------------------------------

# Each call is above MIN_MACS, so the int8 kernel is chosen where it is available.
INT8_CASES = [
    pytest.param(
        nn.Conv2d,
        {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1},
        (16, 16, 8, 8),
        id="2d",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 16,
            "out_channels": 16,
            "kernel_size": 3,
            "stride": 2,
            "dilation": 2,
            "padding": 2,
            "groups": 2,
            "bias": False,
        },
        (8, 16, 21, 21),
        id="2d_stride2_dilation2_groups2_no_bias",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 16,
            "out_channels": 32,
            "kernel_size": (3, 2),
            "padding": "same",
            "padding_mode": "reflect",
        },
        (8, 16, 9, 9),
        id="2d_same_reflect",
    ),
    pytest.param(
        nn.Conv2d,
        {
            "in_channels": 16,
            "out_channels": 32,
            "kernel_size": 3,
            "padding": 1,
            "padding_mode": "circular",
        },
        (8, 16, 9, 9),
        id="2d_circular",
    ),
    pytest.param(
        nn.Conv2d,
        {"in_channels": 32, "out_channels": 32, "kernel_size": 3, "groups": 32, "padding": 1},
        (64, 32, 16, 16),
        id="2d_depthwise",
    ),
    pytest.param(
        nn.Conv1d,
        {"in_channels": 32, "out_channels": 64, "kernel_size": 5, "padding": 2},
        (8, 32, 64),
        id="1d",
    ),
    pytest.param(
        nn.Conv3d,
        {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1},
        (2, 8, 8, 8, 8),
        id="3d",
    ),
]


def _float_rounding_bound(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return a bound on float32 rounding per output element, with both paths on the same codes.

    The reference sums ``K`` float products, each with relative error eps, and the int8
    kernel sums exactly and scales once, so their difference is at most about
    ``(K + 2) * eps * sum(|x_hat| * |w_hat|)`` plus eps of the bias.
    """
    x_hat = layer.quantize_input(x, per_tensor=True).abs()
    weight = layer.dequantized_weight().abs()
    reduction = weight[0].numel()
    bias = None if layer.bias is None else layer.bias.abs()
    layer_magnitude = _with_weight_and_bias(layer, x_hat, weight, bias)
    return (reduction + 2) * FLOAT32_EPS * layer_magnitude


def _with_weight_and_bias(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    return type(layer)._conv(x, weight, bias, layer.stride, padding, layer.dilation, layer.groups)


@needs_int8
@pytest.mark.parametrize("activations", ["static", "dynamic"])
@pytest.mark.parametrize(("conv_type", "kwargs", "shape"), INT8_CASES)
def test_int8_path_matches_reference(conv_type, kwargs, shape, activations) -> None:
    layer = _layer(conv_type, kwargs, activations=activations)
    x = _input(shape)

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        output = layer(x)
        expected = layer.forward_reference(x)
        bound = _float_rounding_bound(layer, x)

    assert kernel == "int8"
    assert output.shape == expected.shape
    assert output.is_contiguous()
    excess = (output - expected).abs() - bound
    assert float(excess.max()) <= 0.0, f"exceeds the rounding bound by {float(excess.max()):.3g}"


@needs_int8
def test_int8_path_per_tensor_weight() -> None:
    kwargs = {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1}
    layer = _layer(nn.Conv2d, kwargs, QuantSpec(bits=8), activations="static")
    x = _input((16, 16, 8, 8))

    with torch.no_grad():
        output = layer(x)
        expected = layer.forward_reference(x)
        bound = _float_rounding_bound(layer, x)

    assert layer.kernel_for(x) == "int8"
    assert float(((output - expected).abs() - bound).max()) <= 0.0


@needs_int8
def test_int8_path_keeps_channels_last() -> None:
    kwargs = {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1}
    layer = _layer(nn.Conv2d, kwargs, activations="static")
    x = _input((16, 16, 8, 8)).contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        output = layer(x)
        expected = layer.forward_reference(x)

    assert layer.kernel_for(x) == "int8"
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)


@needs_int8
def test_int8_path_not_for_weight_only_or_affine() -> None:
    kwargs = {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1}
    x = _input((16, 16, 8, 8))
    weight_only = _layer(nn.Conv2d, kwargs)
    affine = _layer(nn.Conv2d, kwargs, QuantSpec(bits=8, symmetric=False), activations="static")

    assert weight_only.kernel_for(x) == "dense"
    assert affine.kernel_for(x) == "dense"


@needs_int8
def test_small_call_skips_int8() -> None:
    kwargs = {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1}
    layer = _layer(nn.Conv2d, kwargs, activations="static")

    assert layer.kernel_for(_input((1, 16, 8, 8))) == "dense"
    assert layer.kernel_for(_input((16, 16, 8, 8))) == "int8"


@needs_int8
def test_int8_saturating_codes_exact() -> None:
    # Codes 255 against weights -128 saturate int16 pair sums on CPUs without VNNI.
    conv = nn.Conv2d(64, 8, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(-1.0)
    input_qparams = (torch.tensor(1.0), torch.tensor(0, dtype=torch.int32))
    layer = QuantConv2d.from_float(conv, INT8_PER_CHANNEL, "static", input_qparams)
    x = torch.full((32, 64, 8, 8), 255.0)

    with torch.no_grad():
        output = layer(x)
    code_sum = int(layer.weight_codes[0].sum())
    expected = 255.0 * code_sum * float(layer.weight_scale[0])

    assert layer.kernel_for(x) == "int8"
    assert code_sum == -128 * 64 * 9 or code_sum == -127 * 64 * 9
    torch.testing.assert_close(
        output, torch.full_like(output, expected), rtol=2 * FLOAT32_EPS, atol=0.0
    )


@needs_int8
def test_copy_and_pickle_after_an_int8_call() -> None:
    # The plan then contains oneDNN's packed weight, an opaque tensor that cannot be copied.
    layer = _layer(
        nn.Conv2d, {"in_channels": 16, "out_channels": 64, "kernel_size": 3}, activations="static"
    )
    x = _input((8, 16, 32, 32))
    with torch.no_grad():
        assert layer.kernel_for(x) == "int8"
        expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(layer)(x), expected)
        assert torch.equal(restored(x), expected)
