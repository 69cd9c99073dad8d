"""Map floats to integers and back: ``quantize``, ``dequantize`` and ``fake_quantize``.

With ``s = scale`` and ``z = zero_point`` of the block an element belongs to::

    q     = clamp(round(x / s) + z, quant_min, quant_max)      # quantize
    x_hat = (q - z) * s                                         # dequantize
    fake_quantize(x) = dequantize(quantize(x))                 # same dtype as x

``round`` is round-half-to-even (``torch.round``). Inside the clipping range the error
``|x - x_hat|`` is at most ``s / 2``.
"""

from __future__ import annotations

from typing import cast

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


# ---------------------------------------------------------------------------------------------
# fake_quantize
#
# Three implementations compute the same function:
#
# * the reference: the formulas of the module docstring one step at a time, one new tensor per
#   step. Tests compare the other two against it;
# * the fused path, in plain torch (CPU, other devices, and CUDA when torch lacks the kernels):
#   one new float32 tensor that every step updates in place, plus a bool mask of in-range
#   elements for the backward. It divides by the scale like quantize(), so its values are
#   bit-identical to the reference;
# * torch's fake-quantize kernels (CUDA tensors): one pass over the tensor. See the NOTE in
#   fake_quantize's docstring for where their values differ.

_TORCH_KERNELS = (
    "fake_quantize_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "_fake_quantize_learnable_per_tensor_affine",
    "_fake_quantize_learnable_per_channel_affine",
)
HAS_TORCH_FAKE_QUANT_KERNELS = all(hasattr(torch, name) for name in _TORCH_KERNELS)


def _use_torch_kernels(x: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> bool:
    """Return True when torch's fused kernels should fake-quantize ``x``.

    CPU tensors never use them: with torch 2.13 on this project's 2-core test machine, the
    per-channel kernel took about twice the CPU time of the fused in-place path on a 4096x4096
    float32 weight (one thread, forward only).
    """
    if not (HAS_TORCH_FAKE_QUANT_KERNELS and x.is_cuda):
        return False
    # The kernels reject a zero_point off the grid, which the fused path handles like quantize().
    on_grid = (zero_point >= spec.quant_min) & (zero_point <= spec.quant_max)
    return bool(on_grid.all())


def _as_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return ``x`` in a layout its qparams broadcast over: per_group blocks, else ``x`` itself."""
    if spec.granularity == "per_group":
        return to_blocks(x, spec)
    if spec.granularity == "per_token" and x.dim() == 0:
        raise ValueError("per_token needs a tensor with at least one dimension, got a 0-d tensor.")
    return x


def _broadcast_qparam(qparam: torch.Tensor, blocks: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape a qparams tensor to broadcast over ``blocks`` from :func:`_as_blocks`."""
    if spec.granularity == "per_tensor":
        return qparam
    if spec.granularity == "per_channel":
        shape = [1] * blocks.dim()
        shape[spec.axis] = -1
        return qparam.reshape(shape)
    return qparam.unsqueeze(-1)


def _sum_per_block(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum ``values``, shaped like the quantized tensor, over each block into the qparams shape."""
    if spec.granularity == "per_tensor":
        return values.sum()
    if spec.granularity == "per_channel":
        axis = spec.axis % values.dim()
        others = [dim for dim in range(values.dim()) if dim != axis]
        # A vector has one element per block, and sum(dim=[]) would reduce everything.
        return values.sum(dim=others) if others else values.clone()
    return to_blocks(values, spec).sum(dim=-1)


def _dot_per_block(a: torch.Tensor, b: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Return ``sum(a * b)`` over each block as a flat tensor, without a product tensor.

    Returns ``None`` unless ``a`` and ``b`` are contiguous float32 tensors whose blocks are the
    rows of a 2-D view. That rules out per_channel with an axis other than 0, and per_group
    rows that are not a multiple of ``group_size``.
    """
    if not (a.is_contiguous() and b.is_contiguous()) or a.dtype != torch.float32:
        return None
    if b.dtype != torch.float32 or a.dim() == 0 or a.numel() == 0:
        return None
    if spec.granularity == "per_tensor":
        return torch.dot(a.view(-1), b.view(-1))
    if spec.granularity == "per_channel":
        if spec.axis % a.dim() != 0:
            return None
        block = a[0].numel()
    elif spec.granularity == "per_group":
        block = cast(int, spec.group_size)
        if a[0].numel() % block:
            return None
    else:
        block = a.shape[-1]
    rows = a.numel() // max(block, 1)
    # A batch of (1, block) x (block, 1) products: one pass over each input, no temporary.
    return torch.bmm(a.view(rows, 1, block), b.view(rows, block, 1)).view(-1)


def _fused_values(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    keep_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``dequantize(quantize(x))`` as a new float32 tensor and the in-range mask.

    The mask (``None`` unless ``keep_mask``) is True where ``round(x / scale) + zero_point``
    lies in ``[quant_min, quant_max]``. The values tensor is never a view, so callers may
    modify it in place.
    """
    values = x if x.dtype == torch.float32 else x.float()
    blocks = _as_blocks(values, spec)
    step = _broadcast_qparam(scale.float(), blocks, spec)

    # per_group blocks without padding are a view of the output shape. Writing through that
    # view keeps the result a plain tensor, which autograd lets callers modify in place.
    owner = None
    if spec.granularity == "per_group" and blocks.numel() == values.numel():
        owner = torch.empty(values.shape, dtype=torch.float32, device=values.device)
        grid = torch.div(blocks, step, out=owner.view(blocks.shape))
    else:
        grid = torch.div(blocks, step)
    grid.round_()

    # clamp(round(v) + z, quant_min, quant_max) - z equals clamp(round(v), quant_min - z,
    # quant_max - z) on these small integers, which saves adding and subtracting the zero_point.
    low: float | torch.Tensor = float(spec.quant_min)
    high: float | torch.Tensor = float(spec.quant_max)
    if bool(zero_point.any()):
        offset = _broadcast_qparam(zero_point.float(), blocks, spec)
        low, high = low - offset, high - offset

    mask = None
    if keep_mask:
        mask = grid.ge(low)
        mask &= grid.le(high)
    grid.clamp_(low, high)
    grid.mul_(step)

    if owner is not None:
        return owner, None if mask is None else mask.view(values.shape)
    if spec.granularity == "per_group":
        # Cutting off the padding leaves a slice, which contiguous() copies into a plain tensor.
        result = from_blocks(grid, spec, x.shape).contiguous()
        return result, None if mask is None else from_blocks(mask, spec, x.shape)
    return grid, mask


class _FakeQuantizeSTE(torch.autograd.Function):
    """Reference quantize-dequantize with a straight-through estimator, one tensor per step."""

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


class _FusedFakeQuantize(torch.autograd.Function):
    """Fused quantize-dequantize that keeps only a bool mask for the straight-through backward."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[override]
        values, mask = _fused_values(x, scale, zero_point, spec, keep_mask=True)
        ctx.save_for_backward(mask)
        return values.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad_output, 0.0), None, None, None


def _kernel_rows(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Reshape ``x`` and its qparams for torch's per-channel kernels; also return the axis.

    per_group and per_token blocks become the rows of a 2-D tensor with one channel per block.
    A vector becomes a column, because the learnable kernel's backward sums a 1-D tensor whole.
    """
    if spec.granularity == "per_channel" and x.dim() > 1:
        return x, scale, zero_point, spec.axis % x.dim()
    blocks = to_blocks(x, spec)
    rows = blocks.reshape(scale.numel(), -1)
    return rows, scale.reshape(-1), zero_point.reshape(-1), 0


def _from_kernel_rows(result: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Invert :func:`_kernel_rows` for the kernel's output, in ``x``'s dtype."""
    if spec.granularity == "per_channel":
        result = result.reshape(x.shape)
    elif spec.granularity != "per_tensor":
        result = from_blocks(result.reshape(to_blocks(x, spec).shape), spec, x.shape)
    return result.to(x.dtype)


def _kernel_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Fake-quantize ``x`` with torch's kernels, whose autograd applies the same STE mask."""
    values = x.float()
    scale = scale.float()
    zero_point = zero_point.to(torch.int32)
    if spec.granularity == "per_tensor":
        result = torch.fake_quantize_per_tensor_affine(
            values, scale, zero_point, spec.quant_min, spec.quant_max
        )
        return result.to(x.dtype)

    rows, row_scale, row_zero_point, axis = _kernel_rows(values, scale, zero_point, spec)
    result = torch.fake_quantize_per_channel_affine(
        rows, row_scale, row_zero_point, axis, spec.quant_min, spec.quant_max
    )
    return _from_kernel_rows(result, x, spec)


def fake_quantize_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Compute :func:`fake_quantize` step by step in plain torch, as the reference for tests.

    It is slower. On CPU its values and gradient are bit-identical to :func:`fake_quantize`'s.
    """
    _check_qparams(x, scale, spec)
    return _FakeQuantizeSTE.apply(x, scale, zero_point, spec)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return ``dequantize(quantize(x))`` in ``x``'s dtype, differentiable with respect to ``x``.

    The gradient is the straight-through estimator: it passes unchanged where ``x`` falls inside
    the clipping range ``[(quant_min - z) * s, (quant_max - z) * s]`` and is zero outside it.
    The values are computed in float32 whatever ``x``'s dtype.

    NOTE: on CUDA tensors torch's fused kernels do the work. They multiply by ``1 / scale``
    instead of dividing, so an element within one float rounding of a rounding tie can land one
    step away from :func:`quantize`. A model converted after QAT then differs from the QAT
    forward by one step in those weights. The kernels also return ``quant_min`` for NaN,
    infinities and ``|x / scale|`` of ``2**63`` or more, where the CPU path returns NaN or
    clamps.
    """
    _check_qparams(x, scale, spec)
    if _use_torch_kernels(x, zero_point, spec):
        return _kernel_fake_quantize(x, scale, zero_point, spec)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FusedFakeQuantize.apply(x, scale, zero_point, spec)
    values, _ = _fused_values(x, scale, zero_point, spec, keep_mask=False)
    return values.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Learned scale (LSQ, Esser et al. 2020, "Learned Step Size Quantization")
#
# With v = x / s and q = clamp(round(v) + z, quant_min, quant_max), the estimator's derivative
# of the output with respect to s is round(v) - v inside the range and q - z outside it. Both
# equal (output - x * inside) / s, which the fused backward computes from the saved input,
# output and mask instead of storing a float tensor per element.


class _LearnedScaleReference(torch.autograd.Function):
    """Reference LSQ fake quantization, one tensor per step."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, grad_factor):  # type: ignore[override]
        blocks = to_blocks(x, spec).float()
        step = scale.unsqueeze(-1)
        offset = zero_point.unsqueeze(-1)
        ratio = blocks / step
        grid = torch.round(ratio) + offset
        below = grid < spec.quant_min
        above = grid > spec.quant_max
        grid = torch.clamp(grid, spec.quant_min, spec.quant_max)
        values = (grid - offset) * step

        # d(values)/d(scale): round(x/s) - x/s inside the range, the clamped level outside it.
        scale_grad = torch.where(below | above, grid - offset, torch.round(ratio) - ratio)
        inside = ~(below | above)
        ctx.save_for_backward(from_blocks(inside, spec, x.shape), scale_grad)
        ctx.spec, ctx.grad_factor = spec, grad_factor
        return from_blocks(values, spec, x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        inside, scale_grad = ctx.saved_tensors
        grad_blocks = to_blocks(grad_output, ctx.spec).float()
        grad_scale = (grad_blocks * scale_grad).sum(dim=-1) * ctx.grad_factor
        return grad_output * inside, grad_scale, None, None, None


class _FusedLearnedScale(torch.autograd.Function):
    """Fused LSQ fake quantization that saves ``x``, the output and a bool mask, nothing new."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, grad_factor):  # type: ignore[override]
        values, mask = _fused_values(x, scale, zero_point, spec, keep_mask=True)
        output = values.to(x.dtype)
        ctx.save_for_backward(x, output, mask, scale)
        ctx.spec, ctx.grad_factor = spec, grad_factor
        return output

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, output, mask, scale = ctx.saved_tensors
        spec = ctx.spec
        grad_x = torch.where(mask, grad_output, 0.0)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # Summed over a block, (output - x * inside) * g is sum(g * output) - sum(grad_x * x).
            upstream = grad_output.float()
            with_output = _dot_per_block(upstream, output.float(), spec)
            with_input = _dot_per_block(grad_x.float(), x.float(), spec)
            if with_output is not None and with_input is not None:
                per_block = with_output.sub_(with_input).reshape(scale.shape)
            else:
                work = torch.sub(output.float(), x.float())
                torch.where(mask, work, output.float(), out=work)
                per_block = _sum_per_block(work.mul_(upstream), spec)
            grad_scale = per_block.div_(scale).mul_(ctx.grad_factor)
        return grad_x if ctx.needs_input_grad[0] else None, grad_scale, None, None, None


def _kernel_learned_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    grad_factor: float,
) -> torch.Tensor:
    """Apply LSQ with torch's learnable kernels, whose scale gradient matches the reference's."""
    values = x.float()
    scale = scale.float()
    # The learnable kernels take a float zero_point and also compute its gradient, which
    # autograd drops because the zero_point does not require grad.
    zero_point = zero_point.float()
    if spec.granularity == "per_tensor":
        result = torch._fake_quantize_learnable_per_tensor_affine(
            values,
            scale.reshape(1),
            zero_point.reshape(1),
            spec.quant_min,
            spec.quant_max,
            grad_factor,
        )
        return result.to(x.dtype)

    rows, row_scale, row_zero_point, axis = _kernel_rows(values, scale, zero_point, spec)
    result = torch._fake_quantize_learnable_per_channel_affine(
        rows, row_scale, row_zero_point, axis, spec.quant_min, spec.quant_max, grad_factor
    )
    return _from_kernel_rows(result, x, spec)


def learned_scale_fake_quantize_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    grad_factor: float,
) -> torch.Tensor:
    """Compute :func:`learned_scale_fake_quantize` step by step, as the reference for tests."""
    _check_qparams(x, scale, spec)
    return _LearnedScaleReference.apply(x, scale, zero_point, spec, grad_factor)


def learned_scale_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    grad_factor: float,
) -> torch.Tensor:
    """Fake-quantize ``x`` with a gradient for ``scale`` as well (the LSQ estimator).

    The gradient for ``x`` is the straight-through estimator of :func:`fake_quantize`. The
    gradient for ``scale`` is summed over each block and multiplied by ``grad_factor``, which
    LSQ sets to ``1 / sqrt(block_size * quant_max)``. The NOTE of :func:`fake_quantize` about
    CUDA tensors applies here too.
    """
    _check_qparams(x, scale, spec)
    if _use_torch_kernels(x, zero_point, spec):
        return _kernel_learned_scale(x, scale, zero_point, spec, grad_factor)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FusedLearnedScale.apply(x, scale, zero_point, spec, grad_factor)
    values, _ = _fused_values(x, scale, zero_point, spec, keep_mask=False)
    return values.to(x.dtype)
