"""Map floats to integers and back: ``quantize``, ``dequantize`` and ``fake_quantize``.

With ``s = scale`` and ``z = zero_point`` of the block an element belongs to::

    q     = clamp(round(x / s) + z, quant_min, quant_max)      # quantize
    x_hat = (q - z) * s                                         # dequantize
    fake_quantize(x) = dequantize(quantize(x))                 # same dtype as x

``round`` is round-half-to-even (``torch.round``). Inside the clipping range the error
``|x - x_hat|`` is at most ``s / 2``.
"""

from __future__ import annotations

import torch

from mono_quant.core.layout import from_blocks, qparams_shape, to_blocks
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.spec import QuantSpec


def storage_dtype(spec: QuantSpec) -> torch.dtype:
    """Return the unpacked integer dtype of a spec: int8 for symmetric, uint8 for affine."""
    return torch.int8 if spec.symmetric else torch.uint8


def _check_qparams(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> None:
    expected = qparams_shape(x.shape, spec)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)} but a {spec.granularity} spec on a tensor of "
            f"shape {tuple(x.shape)} needs {expected}; compute it with choose_qparams for "
            "this spec."
        )


def _grid(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return the unclamped rounded grid values of ``x`` in blocked float32 form."""
    blocks = to_blocks(x, spec).float()
    return torch.round(blocks / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return the integer codes of ``x`` (int8 or uint8, see :func:`storage_dtype`)."""
    _check_qparams(x, scale, spec)
    grid = torch.clamp(_grid(x, scale, zero_point, spec), spec.quant_min, spec.quant_max)
    return from_blocks(grid, spec, x.shape).to(storage_dtype(spec))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``(q - zero_point) * scale`` as ``dtype``, the inverse of :func:`quantize`."""
    _check_qparams(q, scale, spec)
    blocks = to_blocks(q, spec).float()
    values = (blocks - zero_point.unsqueeze(-1)) * scale.unsqueeze(-1)
    return from_blocks(values, spec, q.shape).to(dtype)


def quantize_tensor(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with qparams from its own min/max; return ``(q, scale, zero_point)``."""
    scale, zero_point = choose_qparams(*min_max(x, spec), spec)
    return quantize(x, scale, zero_point, spec), scale, zero_point


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize with a straight-through estimator, masked outside the clipping range."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[override]
        grid = _grid(x, scale, zero_point, spec)
        inside = (grid >= spec.quant_min) & (grid <= spec.quant_max)
        grid = torch.clamp(grid, spec.quant_min, spec.quant_max)
        values = (grid - zero_point.unsqueeze(-1)) * scale.unsqueeze(-1)

        ctx.save_for_backward(from_blocks(inside, spec, x.shape))
        return from_blocks(values, spec, x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return ``dequantize(quantize(x))`` in ``x``'s dtype, differentiable with respect to ``x``.

    The gradient is the straight-through estimator: it passes unchanged where ``x`` falls inside
    the clipping range ``[(quant_min - z) * s, (quant_max - z) * s]`` and is zero outside it.
    """
    _check_qparams(x, scale, spec)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, spec)
