"""Fused fake quantization: same values and gradients as the step-by-step reference.

The fused path runs on CPU. torch's fake-quantize kernels run on CUDA only, so the tests that
cover them force that path on CPU tensors, where the same kernels exist.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mono_quant.core.quantize as quantize_module
import mono_quant.nn.fake_quant as fake_quant_module
from mono_quant.core.layout import from_blocks, to_blocks
from mono_quant.core.observers import make_observer
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import (
    HAS_TORCH_FAKE_QUANT_KERNELS,
    fake_quantize,
    fake_quantize_reference,
    learned_scale_fake_quantize,
    learned_scale_fake_quantize_reference,
)
from mono_quant.core.spec import QuantSpec
from mono_quant.nn import QuantizedLayer
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.fake_quant import FakeQuantize
from mono_quant.transform.qat import convert_qat, prepare_qat, qat_layers

FLOAT32_EPS = torch.finfo(torch.float32).eps

# (shape, spec keyword arguments) for every granularity, with per_group rows whose length is
# not a multiple of group_size and a per_channel axis other than 0.
CASES = [
    pytest.param((17, 33), {"granularity": "per_tensor"}, id="per_tensor"),
    pytest.param((16, 40), {"granularity": "per_channel", "axis": 0}, id="per_channel"),
    pytest.param((6, 9, 5), {"granularity": "per_channel", "axis": 1}, id="per_channel_axis1"),
    pytest.param((9,), {"granularity": "per_channel", "axis": 0}, id="per_channel_vector"),
    pytest.param((8, 128), {"granularity": "per_group", "group_size": 32}, id="per_group"),
    pytest.param((6, 100), {"granularity": "per_group", "group_size": 32}, id="per_group_ragged"),
    pytest.param((3, 5, 64), {"granularity": "per_token"}, id="per_token"),
]
SYMMETRY = [pytest.param(True, id="symmetric"), pytest.param(False, id="affine")]

# A scale below the min/max one, so that some elements fall outside the grid and get clamped.
SHRINK = 0.7


def _input(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        spread = torch.rand(shape[0], generator=generator) * 4 + 0.1
        values = values * spread.reshape(-1, *[1] * (len(shape) - 1))
    return values.to(dtype)


def _qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero_point = choose_qparams(*min_max(x, spec), spec)
    return scale * SHRINK, zero_point


def _grad_factor(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> float:
    block = x.numel() // max(scale.numel(), 1)
    return 1.0 / math.sqrt(block * spec.quant_max)


def _broadcast_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return the scale of every element of ``x``, shaped like ``x``."""
    blocks = to_blocks(torch.zeros_like(x, dtype=torch.float32), spec)
    return from_blocks(blocks + scale.unsqueeze(-1), spec, x.shape)


def _scale_grad_bound(
    x: torch.Tensor,
    scale: torch.Tensor,
    upstream: torch.Tensor,
    spec: QuantSpec,
    grad_factor: float,
    steps_apart: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bound the scale-gradient gap between two float32 LSQ formulations, per block.

    One formulation sums ``g * (round(x/s) - x/s)``, the other ``g * output`` minus
    ``g * inside * x`` and divides by ``s``. Summing n terms in float32 is off by at most about
    ``n * eps`` times the sum of their magnitudes, each at most ``|g| * (|x / s| + 1)`` here. An
    element whose output lies one step away in the other formulation changes its term by up to
    ``|g|``.
    """
    block = x.numel() // max(scale.numel(), 1)
    ratio = x.float().abs() / _broadcast_scale(x, scale, spec)
    per_element = (block + 8) * FLOAT32_EPS * (ratio + 1.0)
    if steps_apart is not None:
        per_element = per_element + steps_apart.float()
    weighted = upstream.float().abs() * per_element
    return to_blocks(weighted, spec).sum(dim=-1) * grad_factor + 1e-12


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route fake_quantize to torch's fused kernels, which otherwise run only on CUDA."""
    if not HAS_TORCH_FAKE_QUANT_KERNELS:
        pytest.skip("this torch build has no fake-quantize kernels")
    monkeypatch.setattr(quantize_module, "_use_torch_kernels", lambda *args: True)


# ---------------------------------------------------------------------------------------------
# Fused path against the reference


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"]
)
@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), CASES)
def test_fused_values_match_reference(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool, dtype: torch.dtype
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = _input(shape, seed=1, dtype=dtype)
    scale, zero_point = _qparams(x, spec)

    fused = fake_quantize(x, scale, zero_point, spec)
    reference = fake_quantize_reference(x, scale, zero_point, spec)

    assert fused.dtype == dtype
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), CASES)
def test_fused_input_grad_matches_reference(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = _input(shape, seed=2)
    scale, zero_point = _qparams(x, spec)
    upstream = _input(shape, seed=3)

    fused_x = x.clone().requires_grad_()
    fake_quantize(fused_x, scale, zero_point, spec).backward(upstream)
    reference_x = x.clone().requires_grad_()
    fake_quantize_reference(reference_x, scale, zero_point, spec).backward(upstream)

    assert torch.equal(fused_x.grad, reference_x.grad)
    # SHRINK clips some elements, so the mask is not trivially all True.
    assert bool((fused_x.grad == 0).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), CASES)
def test_learned_scale_matches_reference(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool, dtype: torch.dtype
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = _input(shape, seed=4, dtype=dtype)
    scale, zero_point = _qparams(x, spec)
    upstream = _input(shape, seed=5, dtype=dtype)
    grad_factor = _grad_factor(x, scale, spec)

    results = []
    for function in (learned_scale_fake_quantize, learned_scale_fake_quantize_reference):
        leaf_x = x.clone().requires_grad_()
        leaf_scale = scale.clone().requires_grad_()
        output = function(leaf_x, leaf_scale, zero_point, spec, grad_factor)
        output.backward(upstream)
        results.append((output.detach(), leaf_x.grad, leaf_scale.grad))
    (fused, fused_x_grad, fused_scale_grad), (reference, x_grad, scale_grad) = results

    bound = _scale_grad_bound(x, scale, upstream, spec, grad_factor)
    assert torch.equal(fused, reference)
    assert torch.equal(fused_x_grad, x_grad)
    assert fused_scale_grad.shape == scale.shape
    assert bool(((fused_scale_grad - scale_grad).abs() <= bound).all())


@pytest.mark.parametrize("path", ["fused", "kernel"])
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(QuantSpec(bits=4, granularity="per_channel"), id="per_channel"),
        pytest.param(
            QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=4),
            id="per_group_affine",
        ),
    ],
)
def test_learned_scale_jacobian_matches_reference(
    spec: QuantSpec, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "kernel":
        if not HAS_TORCH_FAKE_QUANT_KERNELS:
            pytest.skip("this torch build has no fake-quantize kernels")
        monkeypatch.setattr(quantize_module, "_use_torch_kernels", lambda *args: True)
    x = _input((4, 8), seed=17, dtype=torch.float64)
    scale, zero_point = _qparams(x, spec)
    grad_factor = _grad_factor(x, scale, spec)

    def jacobians(function):
        return torch.autograd.functional.jacobian(
            lambda x, scale: function(x, scale, zero_point, spec, grad_factor), (x, scale)
        )

    x_jacobian, scale_jacobian = jacobians(learned_scale_fake_quantize)
    expected_x_jacobian, expected_scale_jacobian = jacobians(learned_scale_fake_quantize_reference)

    # Row i of the scale Jacobian is the scale gradient for an upstream one-hot at element i.
    one_hot_bound = torch.stack(
        [
            _scale_grad_bound(x, scale, upstream.reshape(x.shape), spec, grad_factor)
            for upstream in torch.eye(x.numel(), dtype=torch.float64)
        ]
    ).reshape(scale_jacobian.shape)
    assert torch.equal(x_jacobian, expected_x_jacobian)
    assert bool(((scale_jacobian - expected_scale_jacobian).abs() <= one_hot_bound).all())


def test_learned_scale_expanded_upstream() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=16)
    x = _input((8, 64), seed=16)
    scale, zero_point = _qparams(x, spec)
    grad_factor = _grad_factor(x, scale, spec)

    grads = []
    for function in (learned_scale_fake_quantize, learned_scale_fake_quantize_reference):
        leaf_scale = scale.clone().requires_grad_()
        # sum() hands back an expanded, non-contiguous gradient of ones.
        function(x, leaf_scale, zero_point, spec, grad_factor).sum().backward()
        grads.append(leaf_scale.grad)

    bound = _scale_grad_bound(x, scale, torch.ones_like(x), spec, grad_factor)
    assert bool(((grads[0] - grads[1]).abs() <= bound).all())


def test_fused_saves_only_bool_mask() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    x = _input((32, 64), seed=6).requires_grad_()
    scale, zero_point = _qparams(x, spec)
    saved: list[torch.Tensor] = []

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fake_quantize(x, scale, zero_point, spec)

    assert len(saved) == 1
    assert saved[0].dtype == torch.bool


def test_learned_scale_saves_no_float_temporary() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=16)
    x = _input((8, 64), seed=7).requires_grad_()
    scale, zero_point = _qparams(x, spec)
    scale.requires_grad_()
    saved: list[torch.Tensor] = []

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = learned_scale_fake_quantize(x, scale, zero_point, spec, 0.1)

    # x, the output and the scale exist anyway, so the mask is the only new tensor.
    new_tensors = [t for t in saved if not any(t is kept for kept in (x, output, scale))]
    assert len(new_tensors) == 1
    assert new_tensors[0].dtype == torch.bool


def test_fused_output_allows_in_place() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
    x = _input((8, 128), seed=8).requires_grad_()
    scale, zero_point = _qparams(x, spec)

    output = fake_quantize(x, scale, zero_point, spec)
    output.mul_(2.0).sum().backward()

    assert x.grad is not None


def test_non_finite_values_match_reference() -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    x = torch.tensor([[float("nan"), float("inf"), 0.3], [-float("inf"), 1e30, -0.2]])
    scale = torch.tensor([0.01, 0.02])
    zero_point = torch.zeros(2, dtype=torch.int32)

    fused = fake_quantize(x, scale, zero_point, spec)
    reference = fake_quantize_reference(x, scale, zero_point, spec)

    assert torch.equal(fused.isnan(), reference.isnan())
    assert torch.equal(fused.nan_to_num(), reference.nan_to_num())


# ---------------------------------------------------------------------------------------------
# torch's kernels (the CUDA path), forced on CPU


def _tie_rows(scale: torch.Tensor, columns: int) -> torch.Tensor:
    """Return rows of values at rounding ties ``(k + 0.5) * scale`` and one ulp to each side."""
    levels = torch.arange(columns // 3 + 1, dtype=torch.float32) - columns // 6 + 0.5
    ties = levels.unsqueeze(0) * scale.unsqueeze(1)
    nearby = [ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)]
    return torch.stack(nearby, dim=-1).reshape(len(scale), -1)[:, :columns]


def _steps_apart(
    kernel: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    return (kernel - reference).detach().abs() / _broadcast_scale(kernel, scale, spec)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(QuantSpec(bits=8, granularity="per_channel"), id="int8_per_channel"),
        pytest.param(QuantSpec(bits=8, symmetric=False), id="uint8_per_tensor"),
        pytest.param(
            QuantSpec(bits=4, granularity="per_group", group_size=32), id="int4_per_group"
        ),
    ],
)
def test_kernel_random_values_rarely_differ(spec: QuantSpec, torch_kernels: None) -> None:
    x = _input((256, 512), seed=9)
    scale, zero_point = choose_qparams(*min_max(x, spec), spec)

    kernel = fake_quantize(x, scale, zero_point, spec)
    reference = fake_quantize_reference(x, scale, zero_point, spec)

    # The extreme of each block maps to x / s = -(quant_max - quant_min) / 2, an exact tie, so
    # up to one element per block may differ. Anywhere else a difference needs a near-tie.
    steps_apart = _steps_apart(kernel, reference, scale, spec)
    limit = scale.numel() + 1e-3 * x.numel()
    assert float(steps_apart.max()) <= 1.0 + 1e-5
    assert int((steps_apart > 0).sum()) <= limit


def test_kernel_ties_within_one_step(torch_kernels: None) -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    scale = torch.linspace(0.001, 0.3, 64)
    zero_point = torch.zeros(64, dtype=torch.int32)
    x = _tie_rows(scale, 600)

    kernel = fake_quantize(x, scale, zero_point, spec)
    reference = fake_quantize_reference(x, scale, zero_point, spec)

    steps_apart = _steps_apart(kernel, reference, scale, spec)
    assert float(steps_apart.max()) <= 1.0 + 1e-5
    # At exact ties the rounding of 1 / scale decides, and the test is void unless some differ.
    assert bool((steps_apart > 0).any())


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), CASES)
def test_kernel_gradients_match_reference(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool, torch_kernels: None
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = _input(shape, seed=10)
    scale, zero_point = _qparams(x, spec)
    upstream = _input(shape, seed=11)
    grad_factor = _grad_factor(x, scale, spec)

    kernel_x = x.clone().requires_grad_()
    kernel_scale = scale.clone().requires_grad_()
    kernel = learned_scale_fake_quantize(kernel_x, kernel_scale, zero_point, spec, grad_factor)
    kernel.backward(upstream)
    reference_x = x.clone().requires_grad_()
    reference_scale = scale.clone().requires_grad_()
    reference = learned_scale_fake_quantize_reference(
        reference_x, reference_scale, zero_point, spec, grad_factor
    )
    reference.backward(upstream)

    steps_apart = _steps_apart(kernel, reference, scale, spec)
    same = steps_apart == 0
    bound = _scale_grad_bound(x, scale, upstream, spec, grad_factor, steps_apart.ceil())
    assert float(steps_apart.max()) <= 1.0 + 1e-5
    assert torch.equal(kernel_x.grad[same], reference_x.grad[same])
    assert bool(((kernel_scale.grad - reference_scale.grad).abs() <= bound).all())


# ---------------------------------------------------------------------------------------------
# FakeQuantize and QAT models


@pytest.mark.parametrize(
    ("spec", "learnable", "observed"),
    [
        pytest.param(QuantSpec(bits=8, granularity="per_channel"), False, False, id="w8"),
        pytest.param(
            QuantSpec(bits=4, granularity="per_group", group_size=16), True, False, id="w4_lsq"
        ),
        pytest.param(STATIC_SPEC, False, True, id="activation"),
    ],
)
def test_module_matches_reference(spec: QuantSpec, learnable: bool, observed: bool) -> None:
    x = _input((16, 64), seed=12)
    observer = make_observer("minmax", spec) if observed else None
    shape = None if observed else tuple(x.shape)
    quantizer = FakeQuantize(spec, shape=shape, observer=observer, learnable_scale=learnable)
    quantizer._refresh_qparams(x)
    leaf = x.clone().requires_grad_()
    upstream = _input((16, 64), seed=13)

    output = quantizer(leaf)
    output.backward(upstream)

    scale = quantizer.current_scale().detach()
    reference_x = x.clone().requires_grad_()
    if learnable:
        reference_scale = scale.clone().requires_grad_()
        grad_factor = 1.0 / math.sqrt(16 * spec.quant_max)
        reference = learned_scale_fake_quantize_reference(
            reference_x, reference_scale, quantizer.zero_point, spec, grad_factor
        )
    else:
        reference = fake_quantize_reference(reference_x, scale, quantizer.zero_point, spec)
    reference.backward(upstream)

    assert torch.equal(output, reference)
    assert torch.equal(leaf.grad, reference_x.grad)
    if learnable:
        # d(loss)/d(log_scale) = d(loss)/d(scale) * scale, since scale = exp(log_scale).
        expected = reference_scale.grad * scale
        bound = _scale_grad_bound(x, scale, upstream, spec, grad_factor) * scale
        assert bool(((quantizer.log_scale.grad - expected).abs() <= bound).all())


def test_weight_range_read_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec(bits=8, granularity="per_channel")
    weight = _input((16, 32), seed=14)
    quantizer = FakeQuantize(spec, shape=tuple(weight.shape))
    calls = []
    counted = fake_quant_module._weight_qparams

    def counting_weight_qparams(*args, **kwargs):
        calls.append(1)
        return counted(*args, **kwargs)

    monkeypatch.setattr(fake_quant_module, "_weight_qparams", counting_weight_qparams)
    quantizer.train()
    quantizer(weight)

    assert len(calls) == 1


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize(("shape", "spec_kwargs"), CASES)
def test_weight_qparams_match_min_max(
    shape: tuple[int, ...], spec_kwargs: dict, symmetric: bool
) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, **spec_kwargs)
    x = _input(shape, seed=15)

    scale, zero_point = fake_quant_module._weight_qparams(x, spec)
    expected_scale, expected_zero_point = choose_qparams(*min_max(x, spec), spec)

    assert torch.equal(scale, expected_scale)
    assert torch.equal(zero_point, expected_zero_point)


def _train_qat(preset: str, steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    prepare_qat(model, preset)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.randn(32, 64)
    for _ in range(steps):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
    return model.eval()


def _converted_weight_gaps(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Return, per QAT layer, each converted weight's distance in steps and the block count."""
    converted = convert_qat(model)
    gaps = []
    with torch.no_grad():
        for name, layer in qat_layers(model):
            quantizer = layer.weight_fake_quant
            fake = quantizer(layer.weight)
            scale = quantizer.current_qparams(layer.weight)[0]
            quantized = converted.get_submodule(name)
            assert isinstance(quantized, QuantizedLayer)
            step = _broadcast_scale(layer.weight, scale, quantizer.spec)
            gaps.append(((fake - quantized.dequantized_weight()).abs() / step, scale.numel()))
    return gaps


@pytest.mark.parametrize("preset", ["w8", "w4"])
def test_converted_weights_equal_fused_qat(preset: str) -> None:
    model = _train_qat(preset)

    for gap, _ in _converted_weight_gaps(model):
        assert float(gap.max()) == 0.0


@pytest.mark.parametrize("preset", ["w8", "w4"])
def test_converted_weights_near_kernel_qat(preset: str, torch_kernels: None) -> None:
    model = _train_qat(preset)

    # As with random tensors, up to one tie per block plus a few near-ties may round apart.
    for gap, blocks in _converted_weight_gaps(model):
        assert float(gap.max()) <= 1.0 + 1e-5
        assert int((gap > 0).sum()) <= blocks + 1e-3 * gap.numel()
