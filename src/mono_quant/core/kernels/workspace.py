"""Dequantize a weight into a reused buffer, for inputs with many rows.

Allocating the float weight on every call costs more than the arithmetic: for a 4096x4096 int8
weight on a 2-core CPU (torch 2.13), ``codes.float()`` took 20 ms, while ``buffer.copy_(codes)``
into an existing buffer took 2.2 ms and ``buffer.mul_(scale[:, None])`` 1.8 ms. The buffers are
shared by every layer of a thread and grow to the largest weight seen.

NOTE: each thread keeps one buffer per (device, dtype) of the size of the largest weight it has
dequantized (64 MiB for a float32 4096x4096 weight) until :func:`release_workspaces` is called
in that thread or the thread ends.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import torch

_local = threading.local()

# Bytes of float32 weight rows dequantized per step, so that a step's passes (unpack, offset,
# scale) hit the CPU cache. Measured on a 4096x4096 int4 per_group weight (2 threads, AMD EPYC
# with 1 MiB L2 per core and 32 MiB L3, torch 2.13): 5.2 ms in steps of 4 MiB, 5.4 ms in steps
# of 8 MiB, 6.8 ms in steps of 1 MiB and 8.8 ms in one step.
# NOTE: the best size depends on the cache sizes.
TILE_BYTES = 4 * 1024 * 1024


def _state() -> tuple[dict[tuple[Any, ...], torch.Tensor], dict[tuple[Any, ...], torch.Tensor]]:
    """Return this thread's buffers by (device, dtype) and its views of them by request."""
    state = getattr(_local, "state", None)
    if state is None:
        state = _local.state = ({}, {})
    return state


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return a contiguous tensor of ``shape`` whose contents are undefined, reused across calls.

    The tensor is a view of this thread's buffer for ``(device, dtype)``, and the same request
    returns the same view. It is valid until the next request with the same device and dtype in
    this thread, so a caller must consume it before another layer asks for the workspace.
    """
    buffers, views = _state()
    view_key = (tuple(shape), dtype, device)
    view = views.get(view_key)
    if view is not None:
        return view

    numel = math.prod(shape)
    key = (torch.device(device), dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)
        # Cached views of the old buffer would keep it alive.
        views.clear()
        # A buffer made inside torch.inference_mode would reject in-place writes outside it.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer

    with torch.inference_mode(False):
        view = buffer[:numel].view(shape)
    views[view_key] = view
    return view


def tile_rows(columns: int) -> int:
    """Return how many float32 rows of ``columns`` values make one dequantization step."""
    return max(1, TILE_BYTES // (4 * max(columns, 1)))


def release_workspaces() -> None:
    """Free this thread's workspace buffers."""
    for table in _state():
        table.clear()


# Integer type wide enough to hold one byte per code of a packed byte: the codes of a byte are
# spread over its bytes and then read as int8. This relies on little-endian byte order.
_WIDE_TYPES = {2: torch.int16, 4: torch.int32}
_LITTLE_ENDIAN = sys.byteorder == "little"


def unpack_codes_into(out: torch.Tensor, packed: torch.Tensor, width: int, offset: int) -> None:
    """Write ``unsigned + offset`` into ``out`` (float, shape (rows, cols)) from packed codes.

    ``packed`` stores ``8 // width`` codes per byte in row-major order, lowest bits first (see
    :mod:`mono_quant.core.packing`). Every row must start on a byte boundary, that is
    ``cols * width % 8 == 0``, and ``unsigned + offset`` must fit int8. The values are small
    integers, so they are exact in any float dtype.
    """
    rows, cols = out.shape
    per_byte = 8 // width
    mask = (1 << width) - 1
    packed = packed.reshape(rows, cols // per_byte)
    if _LITTLE_ENDIAN:
        # Spread the codes of each byte over the bytes of a wider integer, so that its int8 view
        # is the codes in order. All passes stay contiguous; writing float slots with a stride
        # of 2 took about 15% longer for a 4096x4096 int4 weight (2 threads, torch 2.13).
        wide = packed.to(_WIDE_TYPES[per_byte])
        spread = torch.bitwise_and(wide, mask)
        for slot in range(1, per_byte):
            part = torch.bitwise_right_shift(wide, slot * width)
            part.bitwise_and_(mask).bitwise_left_shift_(8 * slot)
            spread.bitwise_or_(part)
        codes = spread.view(torch.int8).view(rows, cols)
        if offset:
            codes.add_(offset)
        out.copy_(codes)
        return

    slots = out.view(rows, cols // per_byte, per_byte)
    for slot in range(per_byte):
        shift = slot * width
        # Both branches allocate, so the in-place offset below never touches ``packed``.
        if shift == 0:
            unsigned = torch.bitwise_and(packed, mask)
        elif shift + width < 8:
            unsigned = torch.bitwise_and(torch.bitwise_right_shift(packed, shift), mask)
        else:
            unsigned = torch.bitwise_right_shift(packed, shift)
        codes = unsigned.view(torch.int8)
        if offset:
            # Adding in int8 costs a pass over 1 byte per code instead of 4 in float32.
            codes.add_(offset)
        slots[:, :, slot].copy_(codes)


def scale_rows_into(
    out: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int | None,
) -> None:
    """Turn integer codes in ``out`` (float, shape (rows, cols)) into ``(q - zero_point) * scale``.

    ``scale`` and ``zero_point`` are scalars (per_tensor), have one value per row (per_channel on
    dim 0) or one per group of ``group_size`` columns (per_group, where a shorter last group
    covers the remainder). The float operations match :func:`mono_quant.core.quantize.dequantize`
    term for term, so the result equals it bit for bit.
    """
    rows, cols = out.shape
    if group_size is None:
        view = out
        factor = scale if scale.dim() == 0 else scale.reshape(rows, 1)
        offset = None
        if zero_point is not None:
            offset = zero_point.float()
            offset = offset if offset.dim() == 0 else offset.reshape(rows, 1)
        if offset is not None:
            view.sub_(offset)
        view.mul_(factor)
        return

    full_groups = cols // group_size
    if full_groups:
        blocks = out[:, : full_groups * group_size].view(rows, full_groups, group_size)
        if zero_point is not None:
            blocks.sub_(zero_point[:, :full_groups].float().unsqueeze(-1))
        blocks.mul_(scale[:, :full_groups].unsqueeze(-1))
    if cols % group_size:
        tail = out[:, full_groups * group_size :]
        if zero_point is not None:
            tail.sub_(zero_point[:, full_groups:].float())
        tail.mul_(scale[:, full_groups:])
