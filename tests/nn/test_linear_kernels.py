"""QuantLinear fast paths against forward_reference, the dispatch between them and their caches.

Tolerances come from the rounding each path adds on top of the reference:

* bfloat16 kernels (int8pack, int4pack) round the input, the scales (and for 4-bit affine
  weights the zero term) and the output to bfloat16, unit roundoff u = eps / 2;
* fbgemm computes exact integer products but rounds ``x * (1 / scale)`` where the reference
  rounds ``x / scale``, so an input within float rounding of a tie lands one code away;
* the workspace dequantizes with the reference's float operations, so the weight is equal and
  only the matmul's float32 rounding can differ.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
import mono_quant.core.kernels.workspace as workspace_module
import mono_quant.nn.linear as linear_module
from mono_quant.core.kernels import reference_kernels
from mono_quant.core.kernels.fbgemm import fbgemm_exact
from mono_quant.core.kernels.int4pack import INT4PACK_MAX_ROWS, has_int4pack_mm
from mono_quant.core.kernels.int8pack import (
    INT8PACK_MAX_ROWS,
    INT8PACK_MAX_ROWS_FLOAT32,
    has_int8pack_mm,
)
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import DYNAMIC_PER_TENSOR_SPEC, DYNAMIC_SPEC, STATIC_SPEC
from mono_quant.nn.linear import (
    FBGEMM,
    INT4PACK,
    INT8PACK,
    REFERENCE,
    WORKSPACE,
    QuantLinear,
)

BFLOAT16_EPS = torch.finfo(torch.bfloat16).eps
FLOAT16_EPS = torch.finfo(torch.float16).eps
FLOAT32_EPS = torch.finfo(torch.float32).eps
IN_FEATURES = 256
OUT_FEATURES = 96  # a multiple of 16, as the int4 kernel needs
# More rows than any bfloat16 kernel takes, so the workspace path runs.
MANY_ROWS = max(INT8PACK_MAX_ROWS_FLOAT32, INT4PACK_MAX_ROWS) + 1

needs_int8pack = pytest.mark.skipif(not has_int8pack_mm(), reason="no aten._weight_int8pack_mm")
needs_int4pack = pytest.mark.skipif(not has_int4pack_mm(), reason="no int4pack kernel")
needs_fbgemm_static = pytest.mark.skipif(
    not fbgemm_exact(255), reason="fbgemm missing or not exact for 8-bit inputs (no VNNI)"
)
needs_fbgemm_dynamic = pytest.mark.skipif(not fbgemm_exact(127), reason="fbgemm missing")

INT8_PER_CHANNEL = QuantSpec(bits=8, granularity="per_channel")
INT8_PER_TENSOR = QuantSpec(bits=8, granularity="per_tensor")
UINT8_PER_CHANNEL = QuantSpec(bits=8, symmetric=False, granularity="per_channel")
INT4_G32 = QuantSpec(bits=4, granularity="per_group", group_size=32)
INT4_G128 = QuantSpec(bits=4, granularity="per_group", group_size=128)
UINT4_G32 = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32)
INT4_PER_CHANNEL = QuantSpec(bits=4, granularity="per_channel")
INT3_G64 = QuantSpec(bits=3, granularity="per_group", group_size=64)
UINT2_G32 = QuantSpec(bits=2, symmetric=False, granularity="per_group", group_size=32)


@pytest.fixture(autouse=True)
def _float32_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the small layers of this file off the dense path, and weight-only layers with many
    rows on the float32 workspace, so each test reaches the path it names on every CPU.

    tests/nn/test_dense_kernels.py covers the dense path; the tests of the bfloat16 workspace
    below turn it back on.
    """
    monkeypatch.setattr(linear_module, "dense_applies", lambda *args: False)
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: False)


def random_input(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def make_layer(
    spec: QuantSpec,
    activations: str | None = None,
    in_features: int = IN_FEATURES,
    out_features: int = OUT_FEATURES,
    bias: bool = True,
    seed: int = 0,
    granularity: str = "per_tensor",
) -> QuantLinear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        linear = nn.Linear(in_features, out_features, bias=bias)
    input_qparams = None
    if activations == "static":
        calibration = random_input((64, in_features), seed=seed + 1)
        input_qparams = choose_qparams(*min_max(calibration, STATIC_SPEC), STATIC_SPEC)
    return QuantLinear.from_float(
        linear,
        spec,
        activations=activations,
        input_qparams=input_qparams,
        activation_granularity=granularity,
    )


def input_shape(rows: int, in_features: int = IN_FEATURES) -> tuple[int, ...]:
    return (rows, in_features)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def group_partials(x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return ``sqrt(sum over groups of (x_g @ w_g)^2)`` per output: scale rounding per group."""
    if spec.granularity != "per_group":
        return (x @ weight.T).abs()
    size = spec.group_size
    partials = torch.einsum(
        "mgk,ngk->mng",
        x.reshape(x.shape[0], -1, size),
        weight.reshape(weight.shape[0], -1, size),
    )
    return partials.square().sum(-1).sqrt()


def bfloat16_tolerance(x: torch.Tensor, layer: QuantLinear, zero: torch.Tensor | None = None):
    """Bound |kernel - reference| per output for the bfloat16 kernels, shaped (rows, out).

    Each of the input, scale and zero term roundings moves one product term by at most u, with
    independent signs, so each sum has a standard deviation of at most u / sqrt(3) times its
    l2 norm; 2 eps = 4 u is about 7 of them. Both sides round the output once (and the
    reference rounds the bias for bfloat16 inputs): 2 eps of |output| + |bias| covers that.
    """
    x = rows_of(x)
    weight = layer.dequantized_weight()
    terms = (x.square() @ weight.square().T).sqrt()
    terms = terms + group_partials(x, weight, layer.weight_spec)
    if zero is not None:
        terms = terms + (x.square() @ zero.square().T).sqrt()
    magnitude = (x @ weight.T).abs()
    if layer.bias is not None:
        magnitude = magnitude + layer.bias.abs()
    return BFLOAT16_EPS * (2 * terms + 2 * magnitude)


def float32_tolerance(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """Bound the float32 rounding of a K-term dot product: K u of sum |x w|, loosely 4 eps."""
    x = rows_of(x)
    weight = layer.dequantized_weight()
    magnitude = x.abs() @ weight.abs().T
    if layer.bias is not None:
        magnitude = magnitude + layer.bias.abs()
    return 4 * FLOAT32_EPS * x.shape[-1] ** 0.5 * magnitude


def fbgemm_tolerance(
    x: torch.Tensor, layer: QuantLinear, input_scale: float | torch.Tensor
) -> torch.Tensor:
    """Bound |fbgemm - reference|: float rounding plus two input codes one step apart.

    ``input_scale`` is a number, or one value per row of ``x`` for per_token inputs.
    """
    rounded = rows_of(layer.quantize_input(x))
    weight = layer.dequantized_weight()
    ties = 2 * input_scale * weight.abs().amax(dim=1)
    tolerance = float32_tolerance(rounded, layer) + ties
    if x.dtype != torch.float32:
        # The reference then runs in the input dtype: its own rounding of x, w and the output.
        eps = torch.finfo(x.dtype).eps
        terms = (rounded.square() @ weight.square().T).sqrt()
        magnitude = (rounded @ weight.T).abs()
        if layer.bias is not None:
            magnitude = magnitude + layer.bias.abs()
        tolerance = tolerance + eps * (2 * terms + 2 * magnitude)
    return tolerance


def within(output: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor) -> str | None:
    """Return None when every output is within tolerance, else a message with the worst ratio."""
    difference = (rows_of(output) - rows_of(expected)).abs()
    if bool((difference <= tolerance).all()):
        return None
    worst = float((difference / tolerance.clamp(min=1e-30)).max())
    return f"difference reaches {worst:.2f} of the tolerance"


def int4_zero_term(layer: QuantLinear) -> torch.Tensor | None:
    """Return the kernel's per-element zero term for 4-bit affine weights, else None."""
    spec = layer.weight_spec
    if spec.symmetric or spec.bits < 4:
        return None
    zero = (8 - layer.weight_zero_point.float()) * layer.weight_scale
    return zero.repeat_interleave(spec.group_size, dim=1)


# ---------------------------------------------------------------------------------------------
# bfloat16 weight-only kernels


@needs_int8pack
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "spec",
    [pytest.param(INT8_PER_CHANNEL, id="per_channel"), pytest.param(INT8_PER_TENSOR, id="tensor")],
)
@pytest.mark.parametrize(
    ("shape", "with_bias"),
    [
        pytest.param((1, IN_FEATURES), True, id="rows1"),
        pytest.param((8, IN_FEATURES), False, id="rows8_no_bias"),
        pytest.param((INT8PACK_MAX_ROWS, IN_FEATURES), True, id="rows_max"),
        pytest.param((2, 3, IN_FEATURES), True, id="3d"),
    ],
)
def test_int8pack_matches_reference(
    shape: tuple[int, ...], with_bias: bool, spec: QuantSpec, dtype: torch.dtype
) -> None:
    layer = make_layer(spec, bias=with_bias, seed=1)
    x = random_input(shape, seed=2, dtype=dtype)

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert kernel == INT8PACK
    assert output.dtype == dtype
    assert output.shape == (*shape[:-1], OUT_FEATURES)
    message = within(output, expected, bfloat16_tolerance(x, layer))
    assert message is None, message


@needs_int8pack
def test_int8pack_non_contiguous_input() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=3)
    x = random_input((IN_FEATURES, 5), seed=4).T

    kernel = layer.kernel_for(x)
    message = within(layer(x), layer.forward_reference(x), bfloat16_tolerance(x, layer))

    assert not x.is_contiguous()
    assert kernel == INT8PACK
    assert message is None, message


INT4PACK_SPECS = [
    pytest.param(INT4_G32, id="int4_g32"),
    pytest.param(INT4_G128, id="int4_g128"),
    pytest.param(UINT4_G32, id="uint4_g32"),
    pytest.param(INT4_PER_CHANNEL, id="int4_per_channel"),
    pytest.param(INT3_G64, id="int3_g64"),
    pytest.param(UINT2_G32, id="uint2_g32"),
]
INT4PACK_CASES = [
    pytest.param((1, IN_FEATURES), True, torch.float32, id="rows1"),
    pytest.param((INT4PACK_MAX_ROWS, IN_FEATURES), True, torch.float32, id="rows_max"),
    pytest.param((2, 3, IN_FEATURES), False, torch.float32, id="3d_no_bias"),
    pytest.param((8, IN_FEATURES), True, torch.bfloat16, id="rows8_bfloat16"),
]


@needs_int4pack
@pytest.mark.parametrize("spec", INT4PACK_SPECS)
@pytest.mark.parametrize(("shape", "with_bias", "dtype"), INT4PACK_CASES)
def test_int4pack_matches_reference(
    shape: tuple[int, ...], with_bias: bool, dtype: torch.dtype, spec: QuantSpec
) -> None:
    layer = make_layer(spec, bias=with_bias, seed=5)
    x = random_input(shape, seed=6, dtype=dtype)

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert kernel == INT4PACK
    assert output.dtype == dtype
    assert output.shape == (*shape[:-1], OUT_FEATURES)
    tolerance = bfloat16_tolerance(x, layer, int4_zero_term(layer))
    message = within(output, expected, tolerance)
    assert message is None, message


@needs_int4pack
def test_int4pack_non_contiguous_input() -> None:
    layer = make_layer(INT4_G32, seed=7)
    x = random_input((IN_FEATURES, 3), seed=8).T

    kernel = layer.kernel_for(x)
    message = within(layer(x), layer.forward_reference(x), bfloat16_tolerance(x, layer))

    assert kernel == INT4PACK
    assert message is None, message


@needs_int4pack
@pytest.mark.parametrize(
    ("spec", "in_features", "out_features"),
    [
        # 48 is not a multiple of any kernel group size (32, 64, 128, 256).
        pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=48), 192, 32, id="g48"),
        pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=16), 64, 32, id="g16"),
        pytest.param(INT4_G32, 256, 40, id="out_features40"),
        pytest.param(INT4_G32, 100, 32, id="ragged_groups"),
        pytest.param(INT4_PER_CHANNEL, 99, 32, id="odd_features"),
    ],
)
def test_int4pack_layout_limits(spec: QuantSpec, in_features: int, out_features: int) -> None:
    layer = make_layer(spec, in_features=in_features, out_features=out_features, seed=9)
    x = random_input((2, in_features), seed=10)

    kernel = layer.kernel_for(x)
    output = layer(x)

    assert kernel == WORKSPACE
    assert torch.allclose(output, layer.forward_reference(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# fbgemm int8 x int8


FBGEMM_WEIGHTS = [
    pytest.param(INT8_PER_CHANNEL, id="per_channel"),
    pytest.param(INT8_PER_TENSOR, id="per_tensor"),
    pytest.param(UINT8_PER_CHANNEL, id="affine"),
    pytest.param(INT4_PER_CHANNEL, id="int4_per_channel"),
]
FBGEMM_CASES = [
    pytest.param((1, IN_FEATURES), True, id="rows1"),
    pytest.param((100, IN_FEATURES), True, id="rows100"),
    pytest.param((2, 3, IN_FEATURES), False, id="3d_no_bias"),
    pytest.param((4, 99), True, id="odd_features"),
]


def input_scale_of(layer: QuantLinear, x: torch.Tensor) -> float | torch.Tensor:
    if layer.activations == "static":
        return float(layer.input_scale)
    if layer.activation_granularity == "per_token":
        scale, _ = choose_qparams(*min_max(x, DYNAMIC_SPEC), DYNAMIC_SPEC)
        return scale.reshape(-1, 1)
    scale, _ = choose_qparams(*min_max(x, DYNAMIC_PER_TENSOR_SPEC), DYNAMIC_PER_TENSOR_SPEC)
    return float(scale)


def check_fbgemm(layer: QuantLinear, x: torch.Tensor) -> None:
    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert kernel == FBGEMM
    assert output.dtype == x.dtype
    assert output.shape == (*x.shape[:-1], layer.out_features)
    message = within(output, expected, fbgemm_tolerance(x, layer, input_scale_of(layer, x)))
    assert message is None, message


@needs_fbgemm_static
@pytest.mark.parametrize("spec", FBGEMM_WEIGHTS)
@pytest.mark.parametrize(("shape", "with_bias"), FBGEMM_CASES)
def test_fbgemm_static_matches_reference(
    shape: tuple[int, ...], with_bias: bool, spec: QuantSpec
) -> None:
    layer = make_layer(spec, "static", in_features=shape[-1], bias=with_bias, seed=11)
    # Scaled past the calibrated range, so some inputs are clipped to 0 or 255.
    check_fbgemm(layer, random_input(shape, seed=12) * 1.5)


@needs_fbgemm_dynamic
@pytest.mark.parametrize("spec", FBGEMM_WEIGHTS)
@pytest.mark.parametrize(("shape", "with_bias"), FBGEMM_CASES)
def test_fbgemm_dynamic_matches_reference(
    shape: tuple[int, ...], with_bias: bool, spec: QuantSpec
) -> None:
    layer = make_layer(spec, "dynamic", in_features=shape[-1], bias=with_bias, seed=13)
    check_fbgemm(layer, random_input(shape, seed=14))


@needs_fbgemm_static
@pytest.mark.parametrize("spec", FBGEMM_WEIGHTS)
@pytest.mark.parametrize(("shape", "with_bias"), FBGEMM_CASES)
def test_fbgemm_per_token_matches_reference(
    shape: tuple[int, ...], with_bias: bool, spec: QuantSpec
) -> None:
    layer = make_layer(
        spec, "dynamic", in_features=shape[-1], bias=with_bias, seed=89, granularity="per_token"
    )
    x = random_input(shape, seed=90)
    # An outlier token, which a per_token grid keeps apart from the others.
    x.reshape(-1, shape[-1])[0] *= 30

    check_fbgemm(layer, x)


@needs_fbgemm_static
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_fbgemm_per_token_non_finite_error(rows: int, value: float) -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=91, granularity="per_token")
    x = random_input((rows, IN_FEATURES), seed=92)
    x[0, 3] = value

    with pytest.raises(ValueError) as fast_error:
        layer(x)
    with pytest.raises(ValueError) as reference_error:
        layer.forward_reference(x)

    assert layer.kernel_for(x) == FBGEMM
    # The same check fails on both paths; the layer's own call adds its name and the fix.
    assert str(fast_error.value.__cause__) == str(reference_error.value)
    assert str(fast_error.value).startswith(f"the input of {layer.describe()}")
    assert "overrides=" in str(fast_error.value)


@needs_fbgemm_dynamic
@pytest.mark.parametrize(
    "values",
    [
        pytest.param("positive", id="all_positive"),
        pytest.param("negative", id="all_negative"),
        pytest.param("zeros", id="all_zero"),
        pytest.param("constant", id="constant"),
    ],
)
def test_fbgemm_dynamic_input_ranges(values: str) -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=15)
    x = random_input((4, IN_FEATURES), seed=16)
    x = {
        "positive": x.abs() + 0.5,
        "negative": -x.abs(),
        "zeros": torch.zeros_like(x),
        "constant": torch.full_like(x, -2.5),
    }[values]

    check_fbgemm(layer, x)


@needs_fbgemm_dynamic
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fbgemm_half_input(dtype: torch.dtype) -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=17)

    check_fbgemm(layer, random_input((5, IN_FEATURES), seed=18, dtype=dtype))


@needs_fbgemm_dynamic
def test_fbgemm_non_contiguous_input() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=19)
    x = random_input((IN_FEATURES, 6), seed=20).T

    assert not x.is_contiguous()
    check_fbgemm(layer, x)


@needs_fbgemm_dynamic
def test_fbgemm_non_finite_input_raises() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=21)
    x = random_input((2, IN_FEATURES), seed=22)
    x[0, 3] = float("nan")

    assert layer.kernel_for(x) == FBGEMM
    with pytest.raises(ValueError, match="NaN"):
        layer(x)


def test_fbgemm_skips_per_group_weights() -> None:
    layer = make_layer(INT4_G32, "dynamic", seed=23)
    x = random_input((2, IN_FEATURES), seed=24)

    assert layer.kernel_for(x) != FBGEMM


@needs_fbgemm_dynamic
def test_fbgemm_per_token_needs_exact_8bit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per-token codes span [0, 255], which saturates on CPUs without VNNI.
    monkeypatch.setattr(
        linear_module, "fbgemm_exact", lambda quant_max, engine=None: quant_max < 255
    )
    per_token = make_layer(INT8_PER_CHANNEL, "dynamic", seed=25, granularity="per_token")
    per_tensor = make_layer(INT8_PER_CHANNEL, "dynamic", seed=25)
    x = random_input((2, IN_FEATURES), seed=26)

    assert per_token.kernel_for(x) != FBGEMM
    assert per_tensor.kernel_for(x) == FBGEMM


# ---------------------------------------------------------------------------------------------
# Workspace


WORKSPACE_SPECS = [
    pytest.param(INT8_PER_CHANNEL, id="int8_per_channel"),
    pytest.param(INT8_PER_TENSOR, id="int8_per_tensor"),
    pytest.param(UINT8_PER_CHANNEL, id="uint8_per_channel"),
    pytest.param(QuantSpec(bits=8, granularity="per_group", group_size=32), id="int8_g32"),
    pytest.param(INT4_G32, id="int4_g32"),
    pytest.param(UINT4_G32, id="uint4_g32"),
    pytest.param(INT3_G64, id="int3_g64"),
    pytest.param(UINT2_G32, id="uint2_g32"),
    pytest.param(QuantSpec(bits=5, granularity="per_channel"), id="int5_per_channel"),
]


@pytest.mark.parametrize("spec", WORKSPACE_SPECS)
@pytest.mark.parametrize(
    "in_features",
    [
        pytest.param(IN_FEATURES, id="features256"),
        # Odd: 4-bit rows do not start on a byte boundary, and groups of 32 end ragged.
        pytest.param(99, id="features99"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_workspace_weight_equals_reference(
    spec: QuantSpec, in_features: int, dtype: torch.dtype
) -> None:
    layer = make_layer(spec, in_features=in_features, seed=27)

    weight = layer.dequantized_weight_workspace(dtype)

    assert weight.dtype == dtype
    assert torch.equal(weight, layer.dequantized_weight(dtype))


@pytest.mark.parametrize("spec", WORKSPACE_SPECS)
def test_workspace_tiles_equal_reference(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch):
    # Tiles of 7 rows, so the 96 rows end in a shorter tile.
    monkeypatch.setattr(workspace_module, "TILE_BYTES", 7 * 4 * IN_FEATURES)
    layer = make_layer(spec, seed=86)

    weight = layer.dequantized_weight_workspace()

    assert workspace_module.tile_rows(IN_FEATURES) == 7
    assert torch.equal(weight, layer.dequantized_weight())


@pytest.mark.parametrize("spec", WORKSPACE_SPECS)
@pytest.mark.parametrize(
    ("shape", "with_bias"),
    [
        pytest.param((MANY_ROWS, IN_FEATURES), True, id="many_rows"),
        pytest.param((MANY_ROWS, 2, IN_FEATURES), False, id="3d_no_bias"),
        pytest.param((MANY_ROWS, 99), True, id="odd_features"),
    ],
)
def test_workspace_matches_reference(
    shape: tuple[int, ...], with_bias: bool, spec: QuantSpec
) -> None:
    layer = make_layer(spec, in_features=shape[-1], bias=with_bias, seed=28)
    x = random_input(shape, seed=29)

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert kernel == WORKSPACE
    message = within(output, expected, float32_tolerance(x, layer))
    assert message is None, message


@pytest.mark.parametrize("spec", WORKSPACE_SPECS)
def test_bf16_workspace_matches_reference(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    # bfloat16 matmuls run on every CPU, only slowly without native support, so the path is
    # tested everywhere.
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: True)
    layer = make_layer(spec, in_features=IN_FEATURES, seed=44)
    x = random_input((MANY_ROWS, 2, IN_FEATURES), seed=45)

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert kernel == linear_module.BF16_WORKSPACE
    assert output.dtype == torch.float32
    assert output.shape == expected.shape
    message = within(output, expected, bfloat16_tolerance(x, layer))
    assert message is None, message


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_bf16_workspace_only_for_weight_only_layers(
    activations: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rounded activations keep their exact float32 values on the float32 workspace.
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: True)
    monkeypatch.setattr(linear_module, "fbgemm_engine", lambda: None)
    layer = make_layer(INT4_G32, activations=activations, seed=46)
    x = random_input((MANY_ROWS, IN_FEATURES), seed=47)

    assert layer.kernel_for(x) == WORKSPACE


@pytest.mark.parametrize(
    ("spec", "kernel", "limit"),
    [
        pytest.param(
            INT8_PER_CHANNEL,
            INT8PACK,
            linear_module.INT8PACK_MAX_ROWS_NATIVE_BF16,
            marks=needs_int8pack,
            id="int8pack",
        ),
        pytest.param(
            INT4_G32,
            INT4PACK,
            linear_module.INT4PACK_MAX_ROWS_NATIVE_BF16,
            marks=needs_int4pack,
            id="int4pack",
        ),
    ],
)
def test_bf16_workspace_takes_over_above_kernel_limit(
    spec: QuantSpec, kernel: str, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: True)
    layer = make_layer(spec, seed=49)

    assert layer.kernel_for(random_input((limit, IN_FEATURES), seed=50)) == kernel
    assert layer.kernel_for(random_input((limit + 1, IN_FEATURES), seed=51)) == (
        linear_module.BF16_WORKSPACE
    )


@pytest.mark.parametrize("spec", [INT8_PER_CHANNEL, UINT4_G32, INT3_G64], ids=str)
def test_bf16_workspace_weight_equals_dequantized_weight(
    spec: QuantSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiles of 8 rows, so the weight is converted in several steps.
    monkeypatch.setattr(workspace_module, "TILE_BYTES", 8 * 4 * IN_FEATURES)
    layer = make_layer(spec, seed=48)

    weight = layer.dequantized_weight_workspace(torch.bfloat16)

    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, layer.dequantized_weight(torch.bfloat16))


@pytest.mark.parametrize(
    "spec",
    [
        INT8_PER_CHANNEL,
        INT8_PER_TENSOR,
        QuantSpec(bits=4, granularity="per_channel"),
        QuantSpec(bits=3, granularity="per_channel"),
    ],
    ids=str,
)
def test_bf16_workspace_exact_codes(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    # Scales that factor out leave integer codes in the workspace, which bfloat16
    # represents exactly. Only the input and the output are rounded to bfloat16.
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: True)
    monkeypatch.setattr(workspace_module, "TILE_BYTES", 8 * 4 * IN_FEATURES)
    layer = make_layer(spec, seed=52)
    x = random_input((MANY_ROWS, IN_FEATURES), seed=53)

    codes = layer._weight_workspace(scaled=False, dtype=torch.bfloat16)
    assert torch.equal(codes.float(), layer.weight_int().float())

    output = layer(x)
    rounded_input = x.to(torch.bfloat16).float()
    exact = (rounded_input.double() @ layer.weight_int().double().T) * layer.weight_scale.double()
    exact = exact + layer.bias.double()
    # The float32 sum of IN_FEATURES products moves by at most IN_FEATURES u32 of the sum of
    # their sizes, the bfloat16 output by u = eps / 2 of its size, and the float32 scale and
    # bias steps by u32 of theirs each.
    codes_exact = layer.weight_int().double()
    matmul = (rounded_input.double() @ codes_exact.T).abs()
    terms = rounded_input.double().abs() @ codes_exact.abs().T
    u32 = torch.finfo(torch.float32).eps / 2
    scale = layer.weight_scale.double().abs()
    bound = scale * (BFLOAT16_EPS / 2 * matmul + IN_FEATURES * u32 * terms)
    bound = bound + 2 * u32 * (exact.abs() + layer.bias.double().abs())
    assert layer.kernel_for(x) == linear_module.BF16_WORKSPACE
    assert bool(((output.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_workspace_half_input(dtype: torch.dtype) -> None:
    layer = make_layer(INT4_G32, seed=30)
    x = random_input((MANY_ROWS, IN_FEATURES), seed=31)
    x = x.to(dtype)

    kernel = layer.kernel_for(x)
    output = layer(x)

    assert kernel == WORKSPACE
    assert output.dtype == dtype
    assert torch.equal(output, layer.forward_reference(x))


def test_workspace_non_contiguous_input() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=32)
    x = random_input((IN_FEATURES, MANY_ROWS), seed=33).T

    kernel = layer.kernel_for(x)
    message = within(layer(x), layer.forward_reference(x), float32_tolerance(x, layer))

    assert kernel == WORKSPACE
    assert message is None, message


def test_workspace_shared_by_layers() -> None:
    first = make_layer(INT8_PER_CHANNEL, seed=34)
    second = make_layer(INT4_G32, seed=35)
    x = random_input((MANY_ROWS, IN_FEATURES), seed=36)

    first_output = first(x)
    second_output = second(x)

    assert torch.allclose(first_output, first.forward_reference(x), rtol=0, atol=1e-5)
    assert torch.allclose(second_output, second.forward_reference(x), rtol=0, atol=1e-5)


def test_workspace_across_inference_mode() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=37)
    x = random_input((MANY_ROWS, IN_FEATURES), seed=38)

    # The buffer is made inside inference mode and written again outside it.
    with torch.inference_mode():
        inside = layer(x)
    with torch.no_grad():
        outside = layer(x)

    assert torch.equal(inside, outside)


def test_workspace_per_thread() -> None:
    layers = [make_layer(spec, seed=39 + i) for i, spec in enumerate([INT8_PER_CHANNEL, INT4_G32])]
    x = random_input((MANY_ROWS, IN_FEATURES), seed=41)
    expected = [layer.forward_reference(x) for layer in layers]
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(index: int) -> None:
        for _ in range(5):
            outputs[index].append(layers[index](x))

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for index in (0, 1):
        for output in outputs[index]:
            assert torch.allclose(output, expected[index], rtol=0, atol=1e-5), index


# ---------------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize(
    ("spec", "activations", "rows", "expected"),
    [
        pytest.param(INT8_PER_CHANNEL, None, 1, INT8PACK, id="w8_rows1"),
        pytest.param(INT8_PER_CHANNEL, None, INT8PACK_MAX_ROWS_FLOAT32, INT8PACK, id="w8_max_rows"),
        pytest.param(
            INT8_PER_CHANNEL, None, INT8PACK_MAX_ROWS_FLOAT32 + 1, WORKSPACE, id="w8_many"
        ),
        pytest.param(UINT8_PER_CHANNEL, None, 1, WORKSPACE, id="affine_w8_rows1"),
        pytest.param(INT4_G32, None, 1, INT4PACK, id="w4_rows1"),
        pytest.param(INT4_G32, None, INT4PACK_MAX_ROWS + 1, WORKSPACE, id="w4_many"),
        pytest.param(INT8_PER_CHANNEL, "dynamic", 1, FBGEMM, id="dynamic_rows1"),
        pytest.param(INT8_PER_CHANNEL, "dynamic", 500, FBGEMM, id="dynamic_rows500"),
        pytest.param(INT8_PER_CHANNEL, "static", 1, FBGEMM, id="static_rows1"),
    ],
)
def test_dispatch_float32(spec: QuantSpec, activations: str | None, rows: int, expected: str):
    available = {
        INT8PACK: has_int8pack_mm(),
        INT4PACK: has_int4pack_mm(),
        FBGEMM: fbgemm_exact(255 if activations == "static" else 127),
    }
    if not available.get(expected, True):
        pytest.skip(f"the {expected} kernel is not available here")
    layer = make_layer(spec, activations, seed=42)

    assert layer.kernel_for(random_input((rows, IN_FEATURES), seed=43)) == expected


@needs_int8pack
def test_dispatch_bfloat16_rows() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=87)
    at_limit = random_input((INT8PACK_MAX_ROWS, IN_FEATURES), seed=88, dtype=torch.bfloat16)
    over_limit = random_input((INT8PACK_MAX_ROWS + 1, IN_FEATURES), seed=88, dtype=torch.bfloat16)

    assert layer.kernel_for(at_limit) == INT8PACK
    assert layer.kernel_for(over_limit) == WORKSPACE


@pytest.mark.parametrize(
    "x",
    [
        pytest.param(torch.zeros(2, IN_FEATURES, dtype=torch.float64), id="float64"),
        pytest.param(torch.zeros(0, IN_FEATURES), id="empty"),
        pytest.param(torch.zeros(2, 10), id="wrong_features"),
    ],
)
def test_dispatch_reference_inputs(x: torch.Tensor) -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=44)

    assert layer.kernel_for(x) == REFERENCE


def test_empty_input_output_shape() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=45)

    output = layer(torch.zeros(0, IN_FEATURES))

    assert output.shape == (0, OUT_FEATURES)


def test_dispatch_axis1_per_channel() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel", axis=1)
    layer = make_layer(spec, seed=46)
    x = random_input((100, IN_FEATURES), seed=47)

    kernel = layer.kernel_for(x)

    assert kernel == REFERENCE
    assert torch.equal(layer(x), layer.forward_reference(x))


def test_reference_kernels_switch() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=48)
    x = random_input((1, IN_FEATURES), seed=49)

    with reference_kernels():
        inside = layer.kernel_for(x)
        with reference_kernels():
            nested = layer.kernel_for(x)
        after_nested = layer.kernel_for(x)
        output = layer(x)
    outside = layer.kernel_for(x)

    assert inside == REFERENCE
    assert nested == REFERENCE
    assert after_nested == REFERENCE
    assert torch.equal(output, layer.forward_reference(x))
    assert outside != REFERENCE


def test_reference_kernels_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=50)
    x = random_input((3, IN_FEATURES), seed=51)

    monkeypatch.setenv("MONO_QUANT_KERNELS", "reference")
    kernel = layer.kernel_for(x)
    output = layer(x)

    assert kernel == REFERENCE
    assert torch.equal(output, layer.forward_reference(x))


def test_unknown_environment_value_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=52)
    monkeypatch.setenv("MONO_QUANT_KERNELS", "fastest-please")

    with pytest.warns(UserWarning, match="MONO_QUANT_KERNELS='fastest-please' is not one of"):
        layer.kernel_for(random_input((1, IN_FEATURES), seed=53))


def test_reference_path_keeps_gradients() -> None:
    layer = make_layer(INT8_PER_CHANNEL, seed=54)
    x = random_input((3, IN_FEATURES), seed=55).requires_grad_()

    kernel = layer.kernel_for(x)
    layer(x).sum().backward()
    gradient = x.grad.clone()
    x.grad = None
    layer.forward_reference(x).sum().backward()

    assert kernel == REFERENCE
    assert torch.equal(gradient, x.grad)


@needs_fbgemm_dynamic
def test_quantized_input_with_grad_uses_fast_path() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=83)
    x = random_input((3, IN_FEATURES), seed=84).requires_grad_()

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    # Rounding to integer codes cuts the graph on both paths, so neither output has a gradient.
    assert kernel == FBGEMM
    assert not output.requires_grad
    assert not expected.requires_grad


# ---------------------------------------------------------------------------------------------
# Prepacked weight cache


@needs_fbgemm_dynamic
def test_cache_built_on_first_call() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=56)
    x = random_input((2, IN_FEATURES), seed=57)
    empty_before = len(layer._kernels) == 0

    layer(x)

    assert empty_before
    assert len(layer._kernels) == 1
    assert not any("kernel" in key for key in layer.state_dict())


@needs_fbgemm_dynamic
def test_cache_rebuilt_after_load_state_dict() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=58)
    other = make_layer(INT8_PER_CHANNEL, "dynamic", seed=59)
    x = random_input((2, IN_FEATURES), seed=60)
    before = layer(x)

    layer.load_state_dict(other.state_dict())
    after = layer(x)

    assert not torch.allclose(before, after)
    assert torch.equal(after, other(x))


@needs_fbgemm_dynamic
def test_cache_rebuilt_after_in_place_change() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", bias=False, seed=61)
    x = random_input((2, IN_FEATURES), seed=62)
    before = layer(x)

    with torch.no_grad():
        layer.weight_scale.mul_(2)
    after = layer(x)

    assert torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-6)


@needs_fbgemm_dynamic
def test_cache_rebuilt_after_buffer_assignment() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", bias=False, seed=67)
    x = random_input((2, IN_FEATURES), seed=68)
    before = layer(x)

    layer.weight_scale = layer.weight_scale * 2
    after = layer(x)

    assert torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-6)


@needs_fbgemm_static
def test_cache_follows_static_input_scale() -> None:
    # The static qparams are read once per packed weight, so an in-place change must reach it.
    layer = make_layer(INT8_PER_CHANNEL, "static", seed=69)
    x = random_input((2, IN_FEATURES), seed=70)
    layer(x)

    with torch.no_grad():
        layer.input_scale.mul_(2)
    output = layer(x)
    expected = layer.forward_reference(x)

    assert layer.kernel_for(x) == FBGEMM
    message = within(output, expected, fbgemm_tolerance(x, layer, float(layer.input_scale)))
    assert message is None, message


@needs_fbgemm_dynamic
def test_cache_rebuilt_after_to() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=63)
    x = random_input((2, IN_FEATURES), seed=64)
    before = layer(x)

    # Any dtype round trip replaces every float buffer.
    layer.double().float()
    cache_size = len(layer._kernels)
    after = layer(x)

    assert cache_size == 0
    assert torch.equal(before, after)


@needs_fbgemm_dynamic
def test_cache_not_deep_copied() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=65)
    x = random_input((2, IN_FEATURES), seed=66)
    before = layer(x)

    copied = copy.deepcopy(layer)
    cache_size = len(copied._kernels)

    assert cache_size == 0
    assert torch.equal(copied(x), before)


# ---------------------------------------------------------------------------------------------
# Dynamic activation granularity


def test_granularity_default_per_token() -> None:
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    layer = QuantLinear.from_float(linear, INT8_PER_CHANNEL, activations="dynamic")

    state = layer.state_dict()["_extra_state"]

    assert layer.activation_granularity == "per_token"
    assert state["activation_granularity"] == "per_token"


def test_granularity_absent_without_dynamic() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "static", seed=68)

    state = layer.state_dict()["_extra_state"]

    assert layer.activation_granularity is None
    assert "activation_granularity" not in state


def test_granularity_per_tensor_grid() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=69)
    x = random_input((8, IN_FEATURES), seed=70)
    scale, zero_point = choose_qparams(
        *min_max(x, DYNAMIC_PER_TENSOR_SPEC), DYNAMIC_PER_TENSOR_SPEC
    )

    codes = layer.quantize_input(x) / scale + zero_point

    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert int(codes.round().min()) >= 0
    assert int(codes.round().max()) <= 127


def test_granularity_per_token_reference() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=71, granularity="per_token")
    x = random_input((4, IN_FEATURES), seed=72)
    x[0] *= 100  # an outlier token that a shared range would flatten the others with

    rounded = layer.quantize_input(x)
    # Each row of 8-bit codes has its own scale, so small rows keep their resolution.
    error = (rounded - x).abs().amax(dim=1)
    row_range = x.amax(dim=1).clamp(min=0) - x.amin(dim=1).clamp(max=0)

    assert bool((error <= row_range / 255 / 2 * (1 + 1e-5)).all())


def test_granularity_round_trips_state_dict() -> None:
    source = make_layer(INT8_PER_CHANNEL, "dynamic", seed=73, granularity="per_token")
    target = make_layer(INT8_PER_CHANNEL, "dynamic", seed=74)

    target.load_state_dict(source.state_dict())

    assert target.activation_granularity == "per_token"


def test_granularity_missing_loads_per_token() -> None:
    source = make_layer(INT8_PER_CHANNEL, "dynamic", seed=75)
    state = source.state_dict()
    # A state saved before the field existed.
    del state["_extra_state"]["activation_granularity"]
    target = make_layer(INT8_PER_CHANNEL, "dynamic", seed=76)

    target.load_state_dict(state)

    assert target.activation_granularity == "per_token"


def test_granularity_invalid_saved_value() -> None:
    state = make_layer(INT8_PER_CHANNEL, "dynamic", seed=77).state_dict()
    state["_extra_state"]["activation_granularity"] = "per_row"
    target = make_layer(INT8_PER_CHANNEL, "dynamic", seed=78)

    with pytest.raises(ValueError, match="activation_granularity='per_row', which is not one of"):
        target.load_state_dict(state)


def test_granularity_invalid_argument() -> None:
    with pytest.raises(ValueError, match="activation_granularity='per_row' is not one of"):
        make_layer(INT8_PER_CHANNEL, "dynamic", seed=79, granularity="per_row")


def test_granularity_in_repr() -> None:
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=80)

    assert "activations=dynamic (per_tensor)" in repr(layer)


def test_per_tensor_reference_uses_7_bits() -> None:
    # A plain re-implementation of the per_tensor reference on the [0, 127] grid.
    layer = make_layer(INT8_PER_CHANNEL, "dynamic", seed=81)
    x = random_input((6, IN_FEATURES), seed=82)
    low = min(float(x.min()), 0.0)
    high = max(float(x.max()), 0.0)
    scale = torch.tensor((high - low) / 127, dtype=torch.float32)
    zero_point = torch.round(-torch.tensor(low, dtype=torch.float32) / scale)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 127)
    rounded = (codes - zero_point) * scale

    with reference_kernels():
        output = layer(x)

    expected = F.linear(rounded, layer.dequantized_weight(), layer.bias)
    assert torch.allclose(output, expected, rtol=1e-5, atol=1e-5)


def small_dynamic_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(85)
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return mq.quantize(model, "w8a8-dynamic")


def fresh_float_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def test_granularity_survives_save_and_load(tmp_path) -> None:
    quantized = small_dynamic_model()
    quantized[0].activation_granularity = "per_tensor"
    path = mq.save(quantized, tmp_path / "model.pt")

    restored = mq.load(path, fresh_float_model())

    assert restored[0].activation_granularity == "per_tensor"
    assert restored[2].activation_granularity == "per_token"


def test_granularity_of_older_file_is_per_token(tmp_path) -> None:
    path = mq.save(small_dynamic_model(), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    # Files written before the field existed have it neither in the config nor in the layers.
    del payload["config"]["activation_granularity"]
    for key, value in payload["state_dict"].items():
        if key.endswith("_extra_state"):
            del value["activation_granularity"]
    torch.save(payload, path)

    restored = mq.load(path, fresh_float_model())

    assert restored[0].activation_granularity == "per_token"
    assert restored[2].activation_granularity == "per_token"
