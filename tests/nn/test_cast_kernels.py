"""CastLayer's float32 workspace path for Linear against its 16-bit reference path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant.nn.cast as cast_module
from mono_quant.core.kernels import reference_kernels
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
    """Dispatch as on a CPU without bfloat16 dot products, where bfloat16 also upcasts."""
    monkeypatch.setattr(cast_module, "has_native_bfloat16", lambda: False)


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


def test_conv_uses_reference() -> None:
    layer = CastLayer(nn.Conv2d(3, 8, 3), torch.float16).requires_grad_(False)

    assert layer.kernel_for(random_input((64, 3, 8, 8), seed=12)) == REFERENCE
