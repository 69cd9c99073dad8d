"""Shared pieces of the convolution and recurrent fast paths.

* :func:`fast_paths_enabled`: the per-call switch (``MONO_QUANT_KERNELS=reference``, tracing,
  device and autograd checks).
* :class:`BufferPlan`: what a layer derives from its buffers (views, qparams, prepacked
  weights), rebuilt when a buffer changes.
* :func:`workspace` and :func:`dequantize_into`: dequantize a weight into a reused buffer, with
  the same float operations as :func:`mono_quant.core.quantize.dequantize`.
* :func:`round_to_grid`, :func:`per_tensor_qparams` and :func:`per_row_qparams`: activation
  rounding and dynamic qparams that equal the reference bit for bit, with fewer tensor ops.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mono_quant.core.kernels.mode import fast_kernels_enabled

# Convolutions and recurrent layers share the Linear layers' per-thread buffer, so a model holds
# one workspace per device and dtype, and one call frees it.
from mono_quant.core.kernels.workspace import release_workspaces as release_workspaces
from mono_quant.core.kernels.workspace import workspace as workspace
from mono_quant.core.qparams import MIN_SCALE, choose_qparams, min_max
from mono_quant.core.spec import QuantSpec

_FLOAT32_MAX = torch.finfo(torch.float32).max


# ---- switch ---------------------------------------------------------------------------------


def fast_paths_enabled(x: torch.Tensor) -> bool:
    """Return True when a layer may run a fast path on input ``x`` in this call.

    The fast paths run on CPU tensors only and never under ``torch.compile`` or
    ``torch.export``, which trace the reference path instead: the prepacked weights and the
    shared workspace are Python state that a graph cannot capture. They are also skipped when
    autograd records the call, because the workspace weight would be overwritten before the
    backward pass reads it.
    """
    # One switch for every layer: mono_quant.reference_kernels(), MONO_QUANT_KERNELS and tracing.
    if not fast_kernels_enabled():
        return False
    # NOTE: CUDA inputs take every layer's reference path here. That path has run on CPU only,
    # because no GPU was available to this project.
    if x.device.type != "cpu":
        return False
    return not (x.requires_grad and torch.is_grad_enabled())


# ---- per-layer plans -----------------------------------------------------------------------


def tensor_versions(tensors: Sequence[torch.Tensor | None]) -> tuple[int, ...]:
    """Return the version counter of each tensor, -1 for None and for inference tensors.

    Tensors created under ``torch.inference_mode`` have no version counter. They cannot be
    modified outside it either, so their identity is enough to tell whether they changed.
    """
    return tuple(
        -1 if tensor is None or tensor.is_inference() else tensor._version for tensor in tensors
    )


class BufferPlan:
    """Facts and views a layer derives from its buffers once and reuses on every call.

    A plan keeps the buffers it was built from and their version counters. The layer builds a
    new plan when :meth:`is_current` is False, that is when a buffer was replaced (``.to()``,
    assignment, ``load_state_dict(assign=True)``) or written in place (``load_state_dict``).
    """

    def __init__(self, sources: tuple[torch.Tensor | None, ...]) -> None:
        self.sources = sources
        self.versions = tensor_versions(sources)

    def is_current(self, sources: tuple[torch.Tensor | None, ...]) -> bool:
        """Return True when ``sources`` are the same buffers, unchanged since the build."""
        for built, now in zip(self.sources, sources, strict=True):
            if built is not now:
                return False
        return self.versions == tensor_versions(sources)

    # A plan may hold prepacked weights (oneDNN's opaque tensors), which can be neither copied
    # nor pickled. Copies and unpickled modules get None and build their own plan on first use.
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return (_no_plan, ())


def _no_plan() -> None:
    return None


def static_input_grid(
    scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return 0-dim float32 tensors ``(scale, zero_point, low, high)`` for :func:`round_to_grid`.

    ``low`` and ``high`` are ``quant_min - zero_point`` and ``quant_max - zero_point``. Tensor
    operands cost less per call than Python numbers, which torch wraps into a new tensor on
    every operation: on an 8x8 image that wrapping took longer than the arithmetic.
    """
    point = int(zero_point)
    values = [point, spec.quant_min - point, spec.quant_max - point]
    grid = torch.tensor(values, dtype=torch.float32, device=scale.device)
    return scale.float(), grid[0], grid[1], grid[2]


def dequantize_into_supported(spec: QuantSpec, shape: Sequence[int]) -> bool:
    """Return True when :func:`dequantize_into` handles a weight of ``spec`` and ``shape``.

    It handles unpacked 8-bit codes with per_tensor, per_channel or per_group scales. per_group
    needs rows (``shape[1:]``) that are a whole number of groups.
    """
    if spec.bits != 8 or not shape:
        return False
    if spec.granularity == "per_group":
        row = math.prod(shape[1:])
        return spec.group_size is not None and row % spec.group_size == 0
    return spec.granularity in ("per_tensor", "per_channel")


def dequantize_factors(
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    shape: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
    """Return ``(factor, offset, blocks)`` for :func:`dequantize_into`.

    ``factor`` and ``offset`` are views of ``scale`` and ``zero_point`` that broadcast over the
    weight, or over its per_group ``blocks`` shape (rows, groups, group_size) when that is not
    None. Being views, they follow in-place changes of the buffers. Check
    :func:`dequantize_into_supported` first.
    """
    blocks = None
    if spec.granularity == "per_tensor":
        factor, offset = scale, zero_point
    elif spec.granularity == "per_channel":
        broadcast = [1] * len(shape)
        broadcast[spec.axis] = -1
        factor = scale.view(broadcast)
        offset = None if zero_point is None else zero_point.view(broadcast)
    else:
        blocks = (shape[0], scale.shape[1], math.prod(shape[1:]) // scale.shape[1])
        factor = scale.unsqueeze(-1)
        offset = None if zero_point is None else zero_point.unsqueeze(-1)
    return factor, offset, blocks


def dequantize_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    factor: torch.Tensor,
    offset: torch.Tensor | None,
    blocks: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Write ``(codes - offset) * factor`` into ``out`` (shaped like ``codes``) and return it.

    With the arguments from :func:`dequantize_factors`, the float operations are those of
    :func:`mono_quant.core.quantize.dequantize`, so the result equals it bit for bit in float32.
    It does in float16 and bfloat16 too: the codes and their differences are small integers,
    exact in those dtypes, and the product is computed in float32 and rounded once.
    """
    out.copy_(codes)
    view = out if blocks is None else out.view(blocks)
    if offset is not None:
        view.sub_(offset)
    view.mul_(factor)
    return out


# ---- activation rounding -------------------------------------------------------------------


def round_to_grid(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
) -> torch.Tensor:
    """Return ``dequantize(quantize(x))`` on an affine per_tensor grid as a new tensor.

    ``low`` and ``high`` are ``quant_min - zero_point`` and ``quant_max - zero_point``. On
    finite values the result equals :func:`mono_quant.nn.activation.quantize_dequantize` bit
    for bit: ``clamp(round(v) + z, quant_min, quant_max) - z`` is ``clamp(round(v), low,
    high)`` on integers, and the float32 division and product are the same. NaN stays NaN,
    where the reference's integer cast turns it into a number. See :func:`static_input_grid`
    for cheap tensor operands.
    """
    values = torch.div(x if x.dtype == torch.float32 else x.float(), scale)
    values.round_()
    _clamp_(values, low, high)
    values.mul_(scale)
    return values if x.dtype == torch.float32 else values.to(x.dtype)


def _clamp_(values: torch.Tensor, low: float | torch.Tensor, high: float | torch.Tensor) -> None:
    if isinstance(low, torch.Tensor):
        # With tensor bounds, clamp_ took 8 us on a 64x128 float32 tensor and clamp_min_ plus
        # clamp_max_ 3 us (one thread, torch 2.13). Both propagate NaN.
        values.clamp_min_(low).clamp_max_(high)
    else:
        values.clamp_(low, high)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return ``round(x / scale) + zero_point``, clamped to the grid, as a float tensor.

    ``scale`` and ``zero_point`` broadcast against ``x`` (one value per row: shape (rows, 1)).
    The codes equal :func:`mono_quant.core.quantize.quantize` exactly.
    """
    codes = torch.div(x if x.dtype == torch.float32 else x.float(), scale)
    codes.round_().add_(zero_point).clamp_(spec.quant_min, spec.quant_max)
    return codes


def _float32(value: float) -> float:
    # A C float conversion rounds to nearest and overflows to infinity.
    return ctypes.c_float(value).value


def _affine_from_range(min_val: float, max_val: float, spec: QuantSpec) -> tuple[float, int]:
    # The steps of choose_qparams for an affine spec. Each float64 operation on float32
    # operands, rounded once to float32, gives the correctly rounded float32 result, so the
    # numbers equal the tensor code's.
    min_neg = min(min_val, 0.0)
    max_pos = max(max_val, 0.0)
    levels = float(spec.quant_max - spec.quant_min)
    scale = _float32(_float32(max_pos / levels) - _float32(min_neg / levels))
    scale = max(scale, MIN_SCALE)
    zero_point = spec.quant_min - round(_float32(min_neg / scale))
    zero_point = min(max(zero_point, spec.quant_min), spec.quant_max)
    widest = max(zero_point - spec.quant_min, spec.quant_max - zero_point, 1)
    scale = min(scale, _float32(_FLOAT32_MAX / widest))
    return scale, zero_point


def per_tensor_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[float, int]:
    """Return ``choose_qparams(*min_max(x, spec), spec)`` for one affine pair over all of ``x``.

    ``spec`` gives the grid (quant_min, quant_max). Its granularity is ignored, so a per_token
    spec gives the pair of a single token. The result is a Python ``(scale, zero_point)``
    equal to the tensor function's, at the cost of one reduction and a few microseconds of
    Python. Inputs with NaN or infinity go through ``choose_qparams``, which raises its usual
    ``ValueError``.
    """
    if spec.symmetric:
        raise ValueError(
            f"per_tensor_qparams needs an affine spec, got {spec}. Use choose_qparams for "
            "symmetric specs."
        )
    if x.numel() == 0:
        return _affine_from_range(0.0, 0.0, spec)
    low, high = torch.aminmax(x.detach())
    min_val, max_val = float(low), float(high)
    if not (math.isfinite(min_val) and math.isfinite(max_val)):
        whole = QuantSpec(spec.bits, symmetric=False, granularity="per_tensor")
        scale, zero_point = choose_qparams(*min_max(x, whole), whole)
        return float(scale), int(zero_point)
    return _affine_from_range(min_val, max_val, spec)


# Magnitude up to which per_row_qparams equals choose_qparams without its overflow cap: the cap
# lowers the scale only when a row's range exceeds float32's maximum (about 3.4e38).
ROW_QPARAMS_MAX_ABS = 1e38


def per_row_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return affine float32 ``(scale, zero_point)`` of each row of 2-D ``x``, shaped (rows, 1).

    The values equal ``choose_qparams`` on ``min_max`` with a per_token spec exactly when
    every ``|x|`` is at most :data:`ROW_QPARAMS_MAX_ABS`. The zero_point is a float tensor of
    integer values, so it broadcasts into float math.

    NOTE: unlike ``choose_qparams`` this neither rejects NaN and infinity nor caps the scale
    for ranges beyond float32's maximum, because it runs at every step of a recurrence.
    Callers check their inputs once instead.
    """
    # Two reductions beat torch.aminmax along a dimension; see mono_quant.core.qparams.min_max.
    low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    if low.dtype != torch.float32:
        low, high = low.float(), high.float()
    min_neg = low.clamp_(max=0.0)
    max_pos = high.clamp_(min=0.0)
    levels = float(spec.quant_max - spec.quant_min)
    scale = max_pos.div_(levels).sub_(min_neg / levels).clamp_(min=MIN_SCALE)
    zero_point = torch.div(min_neg, scale).round_().neg_()
    if spec.quant_min:
        zero_point.add_(spec.quant_min)
    zero_point.clamp_(spec.quant_min, spec.quant_max)
    return scale, zero_point


def checked_per_row_qparams(
    x: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return :func:`per_row_qparams` of 2-D ``x`` when they equal ``choose_qparams``'s, else None.

    None means some row holds NaN, infinity or a magnitude above :data:`ROW_QPARAMS_MAX_ABS`;
    the caller then takes the reference path, which rejects or caps such inputs. The check
    costs one reduction over the (rows, 1) scales: each scale is at least ``max(|x|) /
    levels`` of its row, so a bound on the scales bounds the inputs, and NaN fails it.
    """
    scale, zero_point = per_row_qparams(x, spec)
    levels = spec.quant_max - spec.quant_min
    if not float(scale.max()) <= ROW_QPARAMS_MAX_ABS / levels:
        return None
    return scale, zero_point


def round_rows_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Return ``dequantize(quantize(x))`` of 2-D float32 ``x`` with one affine pair per row.

    ``scale`` and ``zero_point`` come from :func:`checked_per_row_qparams`. Like
    :func:`round_to_grid`, the result equals the reference's bit for bit: clamping
    ``round(v) + z`` to the grid and subtracting ``z`` equals clamping ``round(v)`` to the
    grid shifted by ``-z``.
    """
    values = torch.div(x, scale)
    values.round_()
    _clamp_(values, spec.quant_min - zero_point, spec.quant_max - zero_point)
    return values.mul_(scale)
