"""Tests for QuantLinear: accuracy, storage, fast path, activation modes and state_dict."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.kernels import has_int8pack_mm, int8pack_applies, reference_kernels
from mono_quant.core.layout import to_blocks
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import fake_quantize, quantize, storage_dtype
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.quantized import FORMAT_VERSION, container_bits

BFLOAT16_EPS = torch.finfo(torch.bfloat16).eps
FLOAT32_EPS = torch.finfo(torch.float32).eps

INT8_PER_CHANNEL = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
INT8_PER_TENSOR = QuantSpec(bits=8, symmetric=True, granularity="per_tensor")


def float_linear(in_features: int, out_features: int, seed: int, bias: bool = True) -> nn.Linear:
    """Build an nn.Linear with torch's default init under a fixed seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features, bias=bias)


def random_input(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Return the signal-to-quantization-noise ratio of ``output`` against ``reference``."""
    signal = float(reference.double().square().sum())
    noise = float((reference.double() - output.double()).square().sum())
    return 10 * math.log10(signal / noise)


def bfloat16_tolerance(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Bound the per-output difference between the int8 kernel and the bfloat16 reference.

    Rounding each dequantized weight to bfloat16 moves each product term by at most u = eps / 2
    of its size, independently, so 1.5 eps of ``||x * w||_2`` is over 5 standard deviations of
    their sum. The rounded scale, two output roundings and the bias addition stay within
    2 eps of ``|x @ W.T| + 2 |bias|``.
    """
    weight = layer.dequantized_weight()
    x_float = x.float()
    term_norm = (x_float.square() @ weight.square().T).sqrt()
    magnitude = (x_float @ weight.T).abs()
    if layer.bias is not None:
        magnitude = magnitude + 2 * layer.bias.abs()
    return BFLOAT16_EPS * (1.5 * term_norm + 2 * magnitude)


# ---------------------------------------------------------------------------------------------
# Accuracy of int8 weight-only


def test_int8_per_channel_sqnr() -> None:
    linear = float_linear(512, 512, seed=0)
    layer = QuantLinear.from_float(linear, INT8_PER_CHANNEL)
    x = random_input((64, 512), seed=1)

    with torch.no_grad():
        reference = linear(x)
    measured = sqnr_db(reference, layer(x))

    assert measured >= 35.0, f"output SQNR {measured:.2f} dB is below 35 dB"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(INT8_PER_CHANNEL, id="int8_per_channel"),
        pytest.param(INT8_PER_TENSOR, id="int8_per_tensor"),
        pytest.param(QuantSpec(bits=8, symmetric=False, granularity="per_channel"), id="affine"),
    ],
)
def test_int8_weight_error_within_half_step(spec: QuantSpec) -> None:
    linear = float_linear(512, 512, seed=2)
    layer = QuantLinear.from_float(linear, spec)

    weight = linear.weight.detach()
    error = to_blocks((layer.dequantized_weight() - weight).abs(), spec)
    # Half a step, plus half a float32 ulp for the rounding of the dequantized value.
    bound = layer.weight_scale.unsqueeze(-1) / 2 * (1 + 1e-5)
    bound = bound + to_blocks(weight.abs(), spec) * FLOAT32_EPS / 2
    assert bool((error <= bound).all()), f"worst excess {float((error - bound).max())}"


def test_from_float_leaves_module_unchanged() -> None:
    linear = float_linear(64, 32, seed=3)
    weight_before = linear.weight.detach().clone()

    layer = QuantLinear.from_float(linear, INT8_PER_CHANNEL)

    assert torch.equal(linear.weight, weight_before)
    assert layer.in_features == 64
    assert layer.out_features == 32
    assert layer.bias is not None
    assert not layer.bias.requires_grad


# ---------------------------------------------------------------------------------------------
# Fast path against forward_reference


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(INT8_PER_CHANNEL, id="per_channel"),
        pytest.param(INT8_PER_TENSOR, id="per_tensor"),
    ],
)
@pytest.mark.parametrize(
    "shape", [pytest.param((7, 512), id="2d"), pytest.param((2, 3, 512), id="3d")]
)
def test_forward_matches_reference_float32(spec: QuantSpec, shape: tuple[int, ...]) -> None:
    layer = QuantLinear.from_float(float_linear(512, 512, seed=4), spec)
    x = random_input(shape, seed=5)

    # Few rows run the bfloat16 kernel; tests/nn/test_linear_kernels.py checks it to tolerance.
    with reference_kernels():
        output = layer(x)

    assert torch.equal(output, layer.forward_reference(x))


@pytest.mark.skipif(not has_int8pack_mm(), reason="aten._weight_int8pack_mm is not available")
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(INT8_PER_CHANNEL, id="per_channel"),
        pytest.param(INT8_PER_TENSOR, id="per_tensor"),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_forward_kernel_matches_reference_bfloat16(spec: QuantSpec, with_bias: bool) -> None:
    layer = QuantLinear.from_float(float_linear(512, 512, seed=6, bias=with_bias), spec)
    x = random_input((1, 512), seed=7, dtype=torch.bfloat16)

    output = layer(x)
    expected = layer.forward_reference(x)

    difference = (output.float() - expected.float()).abs()
    tolerance = bfloat16_tolerance(x, layer)
    worst = float((difference / tolerance).max())
    assert int8pack_applies(x, layer.weight_codes)
    assert output.dtype == torch.bfloat16
    assert bool((difference <= tolerance).all()), f"difference reaches {worst:.2f} of tolerance"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(INT8_PER_CHANNEL, id="per_channel"),
        pytest.param(INT8_PER_TENSOR, id="per_tensor"),
    ],
)
@pytest.mark.parametrize(
    ("in_features", "rows"),
    [
        pytest.param(512, 64, id="rows64"),
        # 100 features is not a multiple of the 16 the kernel reads per step.
        pytest.param(100, 1, id="features100"),
    ],
)
def test_forward_fallback_equals_reference_bfloat16(
    spec: QuantSpec, in_features: int, rows: int
) -> None:
    layer = QuantLinear.from_float(float_linear(in_features, 48, seed=8), spec)
    x = random_input((rows, in_features), seed=9, dtype=torch.bfloat16)

    assert not int8pack_applies(x, layer.weight_codes)
    output = layer(x)

    assert output.dtype == torch.bfloat16
    assert torch.equal(output, layer.forward_reference(x))


# ---------------------------------------------------------------------------------------------
# Low-bit storage


LOW_BIT_CASES = [
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=32), id="int4_g32"),
    pytest.param(
        QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32),
        id="uint4_g32",
    ),
    pytest.param(
        QuantSpec(bits=2, symmetric=False, granularity="per_group", group_size=32), id="int2_g32"
    ),
    pytest.param(QuantSpec(bits=2, granularity="per_channel"), id="int2_per_channel"),
    pytest.param(QuantSpec(bits=3, granularity="per_group", group_size=32), id="int3_g32"),
    pytest.param(QuantSpec(bits=5, granularity="per_channel"), id="int5_per_channel"),
    pytest.param(
        QuantSpec(bits=5, symmetric=False, granularity="per_group", group_size=64), id="uint5_g64"
    ),
    pytest.param(QuantSpec(bits=7, granularity="per_tensor"), id="int7_per_tensor"),
]


@pytest.mark.parametrize(
    ("bits", "width"),
    [(2, 2), (3, 4), (4, 4), (5, 8), (6, 8), (7, 8), (8, 8)],
    ids=lambda v: str(v),
)
def test_container_bits(bits: int, width: int) -> None:
    assert container_bits(bits) == width


@pytest.mark.parametrize("spec", LOW_BIT_CASES)
@pytest.mark.parametrize(
    "shape", [pytest.param((48, 128), id="48x128"), pytest.param((10, 100), id="10x100_ragged")]
)
def test_low_bit_storage(spec: QuantSpec, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    linear = float_linear(in_features, out_features, seed=10)
    layer = QuantLinear.from_float(linear, spec)

    width = container_bits(spec.bits)
    expected_bytes = math.ceil(out_features * in_features * width / 8)
    expected_dtype = torch.uint8 if width < 8 else storage_dtype(spec)
    assert layer.weight_codes.dtype == expected_dtype
    assert layer.weight_codes.numel() == expected_bytes
    assert layer.weight_codes.untyped_storage().nbytes() == expected_bytes


@pytest.mark.parametrize("spec", LOW_BIT_CASES)
@pytest.mark.parametrize(
    "shape", [pytest.param((48, 128), id="48x128"), pytest.param((10, 100), id="10x100_ragged")]
)
def test_low_bit_weight_int_round_trip(spec: QuantSpec, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    linear = float_linear(in_features, out_features, seed=11)
    layer = QuantLinear.from_float(linear, spec)

    zero_point = layer.weight_zero_point
    if zero_point is None:
        zero_point = torch.zeros_like(layer.weight_scale, dtype=torch.int32)
    expected = quantize(linear.weight.detach(), layer.weight_scale, zero_point, spec)
    codes = layer.weight_int()

    assert codes.dtype == storage_dtype(spec)
    assert codes.shape == shape
    assert torch.equal(codes, expected)
    assert int(codes.min()) >= spec.quant_min
    assert int(codes.max()) <= spec.quant_max


@pytest.mark.parametrize("spec", LOW_BIT_CASES)
def test_low_bit_output_sqnr(spec: QuantSpec) -> None:
    linear = float_linear(512, 256, seed=12)
    layer = QuantLinear.from_float(linear, spec)
    x = random_input((32, 512), seed=13)

    with torch.no_grad():
        reference = linear(x)
    output = layer(x)
    with reference_kernels():
        output_reference_path = layer(x)
    measured = sqnr_db(reference, output)
    # nn.Linear's default init draws weights uniformly from a symmetric range, and a b-bit
    # uniform grid over a uniform distribution gives an SQNR of about 6.02 * b dB. Keeping 0
    # on the grid and the unbalanced signed grid cost up to about 2.5 dB at 2 bits, so the
    # threshold allows 4 dB.
    threshold = 6.02 * spec.bits - 4.0

    assert torch.equal(output_reference_path, layer.forward_reference(x))
    assert measured >= threshold, f"output SQNR {measured:.2f} dB is below {threshold:.2f} dB"


# ---------------------------------------------------------------------------------------------
# Activation modes


def static_qparams(calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return choose_qparams(*min_max(calibration, STATIC_SPEC), STATIC_SPEC)


def test_static_rounds_input_to_int8_grid() -> None:
    linear = float_linear(64, 32, seed=14)
    calibration = random_input((16, 64), seed=15)
    input_scale, input_zero_point = static_qparams(calibration)
    layer = QuantLinear.from_float(
        linear,
        INT8_PER_CHANNEL,
        activations="static",
        input_qparams=(input_scale, input_zero_point),
    )
    # Scaled past the calibrated range, so some inputs are clipped.
    x = random_input((8, 64), seed=16) * 1.5

    # The fbgemm kernel rounds x * (1 / scale); tests/nn/test_linear_kernels.py covers it.
    with reference_kernels():
        output = layer(x)
    rounded = fake_quantize(x, input_scale, input_zero_point, STATIC_SPEC)
    expected = F.linear(rounded, layer.dequantized_weight(), layer.bias)

    assert not torch.equal(rounded, x)
    assert torch.equal(layer.input_scale, input_scale)
    assert torch.equal(layer.input_zero_point, input_zero_point)
    assert torch.equal(output, expected)


def test_static_without_input_qparams() -> None:
    with pytest.raises(ValueError, match="static activations need input qparams"):
        QuantLinear.from_float(float_linear(8, 4, seed=0), INT8_PER_CHANNEL, activations="static")


def test_invalid_activation_mode() -> None:
    with pytest.raises(ValueError, match="activations='int8' is not one of"):
        QuantLinear.from_float(float_linear(8, 4, seed=0), INT8_PER_CHANNEL, activations="int8")


def per_token_reference(x: torch.Tensor) -> torch.Tensor:
    """Round each row of the last dimension onto its own affine uint8 grid, one row at a time."""
    rows = x.reshape(-1, x.shape[-1])
    rounded_rows = []
    for row in rows:
        min_neg = torch.clamp(row.min(), max=0.0)
        max_pos = torch.clamp(row.max(), min=0.0)
        scale = torch.clamp(max_pos / 255.0 - min_neg / 255.0, min=FLOAT32_EPS)
        zero_point = torch.clamp(-torch.round(min_neg / scale), 0, 255)
        codes = torch.clamp(torch.round(row / scale) + zero_point, 0, 255)
        rounded_rows.append((codes - zero_point) * scale)
    return torch.stack(rounded_rows).reshape(x.shape)


@pytest.mark.parametrize("spec", [pytest.param(INT8_PER_CHANNEL, id="int8"), LOW_BIT_CASES[0]])
@pytest.mark.parametrize(
    "shape", [pytest.param((6, 64), id="2d"), pytest.param((2, 3, 64), id="3d")]
)
def test_dynamic_per_token_matches_reference(spec: QuantSpec, shape: tuple[int, ...]) -> None:
    layer = QuantLinear.from_float(
        float_linear(64, 32, seed=17),
        spec,
        activations="dynamic",
        activation_granularity="per_token",
    )
    x = random_input(shape, seed=18)
    # One all-positive and one constant row, whose ranges are widened to include 0.
    x.view(-1, 64)[0] = x.view(-1, 64)[0].abs() + 1
    x.view(-1, 64)[1] = -3.0

    with reference_kernels():
        output = layer(x)
    rounded = per_token_reference(x)
    expected = F.linear(rounded, layer.dequantized_weight(), layer.bias)

    assert not hasattr(layer, "input_scale")
    assert torch.equal(output, expected)


# ---------------------------------------------------------------------------------------------
# state_dict


STATE_CASES = [
    pytest.param(INT8_PER_CHANNEL, None, id="int8_per_channel"),
    pytest.param(QuantSpec(bits=8, symmetric=False, granularity="per_channel"), None, id="uint8"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=32), None, id="int4_g32"),
    pytest.param(INT8_PER_TENSOR, "static", id="int8_static"),
    pytest.param(INT8_PER_CHANNEL, "dynamic", id="int8_dynamic"),
]


def build_layer(spec: QuantSpec, activations: str | None, seed: int) -> QuantLinear:
    input_qparams = None
    if activations == "static":
        input_qparams = static_qparams(random_input((16, 64), seed=seed + 1))
    return QuantLinear.from_float(
        float_linear(64, 48, seed=seed), spec, activations=activations, input_qparams=input_qparams
    )


@pytest.mark.parametrize(("spec", "activations"), STATE_CASES)
def test_state_dict_contents(spec: QuantSpec, activations: str | None) -> None:
    state = build_layer(spec, activations, seed=20).state_dict()
    layout = state["_extra_state"]

    assert "weight_codes" in state
    assert "weight_scale" in state
    assert "bias" in state
    assert ("weight_zero_point" in state) == (not spec.symmetric)
    assert ("input_scale" in state) == (activations == "static")
    assert ("input_zero_point" in state) == (activations == "static")
    assert layout["format_version"] == FORMAT_VERSION
    assert layout["bits"] == spec.bits
    assert layout["container_bits"] == container_bits(spec.bits)
    assert layout["symmetric"] == spec.symmetric
    assert layout["granularity"] == spec.granularity
    assert layout["group_size"] == spec.group_size
    assert layout["weight_shape"] == [48, 64]
    assert layout["activations"] == activations


@pytest.mark.parametrize(("spec", "activations"), STATE_CASES)
def test_state_dict_loads_into_fresh_layer(spec: QuantSpec, activations: str | None) -> None:
    source = build_layer(spec, activations, seed=21)
    target = build_layer(spec, activations, seed=31)
    x = random_input((5, 64), seed=22)
    assert not torch.equal(source(x), target(x))

    target.load_state_dict(source.state_dict(), strict=True)

    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(("spec", "activations"), STATE_CASES)
def test_state_dict_survives_weights_only_load(spec: QuantSpec, activations: str | None) -> None:
    source = build_layer(spec, activations, seed=23)
    target = build_layer(spec, activations, seed=33)
    buffer = io.BytesIO()

    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    target.load_state_dict(loaded, strict=True)

    x = random_input((5, 64), seed=24)
    assert loaded["_extra_state"] == source.state_dict()["_extra_state"]
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    ("target_spec", "match"),
    [
        pytest.param(
            QuantSpec(bits=7, granularity="per_channel"), "bits: saved 8, layer 7", id="bits7"
        ),
        pytest.param(
            QuantSpec(bits=4, granularity="per_channel"), "bits: saved 8, layer 4", id="bits4"
        ),
        pytest.param(
            QuantSpec(bits=8, symmetric=False, granularity="per_channel"),
            "symmetric: saved True, layer False",
            id="affine",
        ),
    ],
)
def test_state_dict_rejects_other_layout(target_spec: QuantSpec, match: str) -> None:
    state = build_layer(INT8_PER_CHANNEL, None, seed=25).state_dict()
    target = build_layer(target_spec, None, seed=26)

    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state, strict=False)


def test_state_dict_rejects_newer_format() -> None:
    state = build_layer(INT8_PER_CHANNEL, None, seed=27).state_dict()
    state["_extra_state"] = {**state["_extra_state"], "format_version": FORMAT_VERSION + 1}
    target = build_layer(INT8_PER_CHANNEL, None, seed=28)

    with pytest.raises(ValueError, match=f"format_version={FORMAT_VERSION + 1}, newer than"):
        target.load_state_dict(state)


def test_rejected_state_dict_leaves_layer_unchanged() -> None:
    state = build_layer(QuantSpec(bits=7, granularity="per_channel"), None, seed=29).state_dict()
    target = build_layer(INT8_PER_CHANNEL, None, seed=30)
    before = {
        name: tensor.clone()
        for name, tensor in target.state_dict().items()
        if torch.is_tensor(tensor)
    }

    with pytest.raises(ValueError, match="bits: saved 7, layer 8"):
        target.load_state_dict(state, strict=False)

    for name, tensor in before.items():
        assert torch.equal(target.state_dict()[name], tensor), name
