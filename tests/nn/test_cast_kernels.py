"""CastLayer's float32 paths (Linear workspace, upcast copies) against its 16-bit reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant.nn.cast as cast_module
from mono_quant.core.kernels import reference_kernels
from mono_quant.nn.attention import CastMultiheadAttention
from mono_quant.nn.cast import CAST_MAX_ROWS, REFERENCE, WORKSPACE, CastLayer

IN_FEATURES = 256
OUT_FEATURES = 96


def float_linear(seed: int, bias: bool = True) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def no_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch as on a CPU without 16-bit float arithmetic, where both 16-bit dtypes upcast."""
    monkeypatch.setattr(cast_module, "has_native_bfloat16", lambda: False)
    monkeypatch.setattr(cast_module, "has_native_float16", lambda: False)


def cast_tolerance(x: torch.Tensor, layer: CastLayer) -> torch.Tensor:
    """Bound |workspace - reference| per output, shaped (rows, out).

    Both use the same 16-bit weight. The reference also rounds the input (independent errors
    of at most u = eps / 2 per product term: 2 eps of their l2 norm is about 7 standard
    deviations), the bias and the output (2 eps of |output| + |bias| covers both).
    """
    eps = torch.finfo(layer.dtype).eps
    rows = x.reshape(-1, x.shape[-1])
    weight = layer.module.weight.float()
    terms = (rows.square() @ weight.square().T).sqrt()
    magnitude = (rows @ weight.T).abs()
    if layer.module.bias is not None:
        magnitude = magnitude + layer.module.bias.float().abs()
    return eps * (2 * terms + 2 * magnitude)


@pytest.mark.usefixtures("no_native_bfloat16")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((CAST_MAX_ROWS + 1, IN_FEATURES), id="rows_over_limit"),
        pytest.param((64, IN_FEATURES), id="rows64"),
        pytest.param((4, 16, IN_FEATURES), id="3d"),
    ],
)
def test_workspace_matches_reference(
    shape: tuple[int, ...], with_bias: bool, dtype: torch.dtype
) -> None:
    layer = CastLayer(float_linear(seed=0, bias=with_bias), dtype).requires_grad_(False)
    x = random_input(shape, seed=1)

    kernel = layer.kernel_for(x)
    output = layer(x)
    expected = layer.forward_reference(x)

    difference = (output - expected).reshape(-1, OUT_FEATURES).abs()
    tolerance = cast_tolerance(x, layer)
    worst = float((difference / tolerance).max())
    assert kernel == WORKSPACE
    assert output.dtype == torch.float32
    assert output.shape == (*shape[:-1], OUT_FEATURES)
    assert bool((difference <= tolerance).all()), f"difference reaches {worst:.2f} of tolerance"


@pytest.mark.usefixtures("no_native_bfloat16")
def test_workspace_non_contiguous_input() -> None:
    layer = CastLayer(float_linear(seed=2), torch.float16).requires_grad_(False)
    x = random_input((IN_FEATURES, 40), seed=3).T

    kernel = layer.kernel_for(x)
    difference = (layer(x) - layer.forward_reference(x)).abs()

    assert not x.is_contiguous()
    assert kernel == WORKSPACE
    assert bool((difference <= cast_tolerance(x, layer)).all())


def test_few_rows_use_reference() -> None:
    layer = CastLayer(float_linear(seed=4), torch.float16).requires_grad_(False)
    x = random_input((CAST_MAX_ROWS, IN_FEATURES), seed=5)

    kernel = layer.kernel_for(x)

    assert kernel == REFERENCE
    assert torch.equal(layer(x), layer.forward_reference(x))


def test_native_bfloat16_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cast_module, "has_native_bfloat16", lambda: True)
    layer = CastLayer(float_linear(seed=6), torch.bfloat16).requires_grad_(False)

    assert layer.kernel_for(random_input((64, IN_FEATURES), seed=7)) == REFERENCE


def test_native_float16_linear_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cast_module, "has_native_float16", lambda: True)
    monkeypatch.setattr(cast_module, "NATIVE_FLOAT16_MIN_WEIGHT", 1)
    layer = CastLayer(float_linear(seed=6), torch.float16).requires_grad_(False)
    x = random_input((64, IN_FEATURES), seed=7)

    assert layer.kernel_for(x) == REFERENCE
    assert torch.equal(layer(x), layer.forward_reference(x))


def test_native_float16_small_linear_uses_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cast_module, "has_native_float16", lambda: True)
    layer = CastLayer(float_linear(seed=6), torch.float16).requires_grad_(False)

    assert layer.module.weight.numel() < cast_module.NATIVE_FLOAT16_MIN_WEIGHT
    assert layer.kernel_for(random_input((64, IN_FEATURES), seed=7)) == WORKSPACE


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("gradients", id="parameters_need_grad"),
        pytest.param("float64", id="float64_input"),
        pytest.param("keyword", id="keyword_input"),
        pytest.param("hook", id="forward_hook"),
        pytest.param("switch", id="reference_kernels"),
    ],
)
@pytest.mark.usefixtures("no_native_bfloat16")
def test_reference_cases(case: str) -> None:
    layer = CastLayer(float_linear(seed=8), torch.float16)
    if case != "gradients":
        layer.requires_grad_(False)
    x = random_input((64, IN_FEATURES), seed=9)
    args, kwargs = (x,), {}
    if case == "float64":
        args = (x.double(),)
    if case == "keyword":
        args, kwargs = (), {"input": x}
    if case == "hook":
        layer.module.register_forward_hook(lambda module, inputs, output: output)

    if case == "switch":
        with reference_kernels():
            kernel = layer.kernel_for(*args, **kwargs)
    else:
        kernel = layer.kernel_for(*args, **kwargs)

    assert kernel == REFERENCE


@pytest.mark.usefixtures("no_native_bfloat16")
def test_no_grad_allows_workspace_with_trainable_parameters() -> None:
    layer = CastLayer(float_linear(seed=10), torch.float16)
    x = random_input((64, IN_FEATURES), seed=11)

    with torch.no_grad():
        kernel = layer.kernel_for(x)

    assert layer.module.weight.requires_grad
    assert kernel == WORKSPACE


# ---- upcast path: other modules run in float32 on float32 copies of the 16-bit weights --------


@pytest.mark.usefixtures("no_native_bfloat16")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("module", "shape"),
    [
        pytest.param(nn.Conv2d(3, 8, 3, padding=1), (4, 3, 8, 8), id="conv2d"),
        pytest.param(nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 9), id="conv_transpose1d"),
        pytest.param(nn.Conv1d(64, 512, 5), (2, 64, 20), id="conv1d_over_copy_limit"),
    ],
)
def test_upcast_equals_float32_on_rounded_weights(
    module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    layer = CastLayer(module, dtype)
    x = random_input(shape, seed=12)
    upcast = type(module)(**_constructor_arguments(module))
    upcast.load_state_dict({k: v.float() for k, v in layer.module.state_dict().items()})

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        output = layer(x)
        expected = upcast(x)
        reference = layer.forward_reference(x)

    assert kernel == "upcast"
    assert output.dtype == torch.float32
    assert torch.equal(output, expected)
    # The reference also rounds the input and output to 16 bits: a few eps of the output.
    scale = float(expected.abs().amax())
    torch.testing.assert_close(
        output, reference, rtol=0, atol=8 * torch.finfo(dtype).eps * scale * shape[1] ** 0.5
    )


def _constructor_arguments(module: nn.Module) -> dict:
    names = ("in_channels", "out_channels", "kernel_size", "stride", "padding")
    return {name: getattr(module, name) for name in names}


@pytest.mark.usefixtures("no_native_bfloat16")
def test_upcast_attention_matches_float32_copy() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(13)
        mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = CastMultiheadAttention.from_float(mha, torch.float16)
    x = random_input((2, 5, 32), seed=14)
    upcast = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    upcast.load_state_dict({k: v.float() for k, v in layer.module.state_dict().items()})

    with torch.no_grad():
        kernel = layer.kernel_for(x, x, x)
        output, weights = layer(x, x, x)
        expected, expected_weights = upcast(x, x, x)

    assert kernel == "upcast"
    assert torch.equal(output, expected)
    assert torch.equal(weights, expected_weights)


@pytest.mark.usefixtures("no_native_bfloat16")
def test_upcast_copies_follow_load_state_dict() -> None:
    layer = CastLayer(nn.Conv2d(3, 8, 3), torch.float16)
    other = CastLayer(nn.Conv2d(3, 8, 3), torch.float16)
    x = random_input((1, 3, 6, 6), seed=15)

    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        after = layer(x)
        expected = other(x)

    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


@pytest.mark.usefixtures("no_native_bfloat16")
@pytest.mark.parametrize(
    "case", ["lstm", "gradients", "float64", "integer_only", "native_bfloat16", "switch"]
)
def test_upcast_reference_cases(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = torch.bfloat16 if case == "native_bfloat16" else torch.float16
    if case == "native_bfloat16":
        monkeypatch.setattr(cast_module, "has_native_bfloat16", lambda: True)
    if case == "lstm":
        layer, x = CastLayer(nn.LSTM(4, 8), dtype), random_input((3, 1, 4), seed=16)
    elif case == "integer_only":
        layer, x = CastLayer(nn.Embedding(10, 4), dtype), torch.tensor([1, 2, 3])
    else:
        layer, x = CastLayer(nn.Conv2d(3, 8, 3), dtype), random_input((1, 3, 6, 6), seed=16)
    if case == "float64":
        x = x.double()

    if case == "switch":
        with reference_kernels(), torch.no_grad():
            kernel = layer.kernel_for(x)
    elif case == "gradients":
        kernel = layer.kernel_for(x)
    else:
        with torch.no_grad():
            kernel = layer.kernel_for(x)

    assert kernel == REFERENCE
