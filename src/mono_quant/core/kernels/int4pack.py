"""Weight-only int4 linear on CPU through ``aten._weight_int4pack_mm_for_cpu``.

The kernel dequantizes code ``q`` in [0, 15] of group ``g`` as ``(q - 8) * scale[g] + zero[g]``
and multiplies in the activation dtype. A symmetric code ``c`` in [-8, 7] maps to
``q = c + 8`` with ``zero = 0``. An affine code ``c`` in [0, 15] with integer zero_point ``zp``
maps to ``q = c`` with ``zero = (8 - zp) * scale``. Codes of 2 and 3 bits fit the same grid.

Limits of torch 2.13, checked in :func:`int4pack_group_size`: out_features a multiple of 16 and
kernel group sizes of 32, 64, 128 or 256 that divide in_features. A wider weight group (per_channel
or a larger group_size) is split into kernel groups that repeat its scale.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from mono_quant.core.kernels.int8pack import kernel_rows

# Rows (tokens) up to which the bfloat16 int4 kernel runs instead of dequantize + float32
# F.linear; above it the workspace keeps float32 activations. Measured for a 4096x4096 layer
# with group_size 32 (2 threads, AMD EPYC with AVX-512 VNNI/BF16, torch 2.13). At 128 / 256 /
# 512 rows the kernel took 25.5 / 50.7 / 101 ms, the float32 workspace path 32.1 / 52.4 / 98.0
# ms and float32 F.linear 26.5 / 46.9 / 94.2 ms.
# NOTE: other CPUs (AVX2, no native bfloat16) may move the crossover.
INT4PACK_MAX_ROWS = 256
# The same for weight-only layers on CPUs with native bfloat16, where the bfloat16 workspace
# takes the rows above it. Measured with group_size 128 on 1024x1024 and 4096x4096 layers, 1
# and 2 threads. At 48 rows the kernel was ahead or level: 1.0x to 1.36x of float32 against
# 0.99x to 1.33x. At 64 rows it was behind in every case: 0.98x to 1.26x against 1.14x to 1.47x.
INT4PACK_MAX_ROWS_NATIVE_BF16 = 48
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
_OUT_FEATURES_MULTIPLE = 16
# Inner K tiles of the packed layout. The CPU packing gives the same bytes for 1, 2, 4 and 8.
_INNER_K_TILES = 1


class Int4PackedWeight(NamedTuple):
    """Weight in the layout of ``aten._weight_int4pack_mm_for_cpu``."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int


@functools.cache
def has_int4pack_mm() -> bool:
    """Return True when the int4 pack and matmul ops exist and run in this torch build."""
    aten = torch.ops.aten
    if not (
        hasattr(aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")
    ):
        return False
    try:
        codes = torch.full((16, 32), 9, dtype=torch.int32)
        packed = aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
        scales_and_zeros = torch.ones(1, 16, 2, dtype=torch.bfloat16)
        x = torch.ones(1, 32, dtype=torch.bfloat16)
        output = aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    except (RuntimeError, NotImplementedError):
        return False
    # Each weight dequantizes to (9 - 8) * 1 + 1 = 2, so each output is 2 * 32.
    return bool((output == 64).all())


def int4pack_group_size(out_features: int, in_features: int, block: int) -> int | None:
    """Return the kernel group size for weight groups of ``block`` elements, or None.

    ``block`` is the group_size of a per_group weight, or ``in_features`` for per_channel and
    per_tensor weights. None means the kernel cannot represent the layout.
    """
    if out_features % _OUT_FEATURES_MULTIPLE or in_features % block:
        return None
    for size in INT4PACK_GROUP_SIZES:
        if block % size == 0:
            return size
    return None


def pack_int4_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
) -> Int4PackedWeight | None:
    """Pack codes of shape (out, in) for :func:`int4pack_linear`, or return None.

    ``scale`` and ``zero_point`` have shape (out, in // group_size), one pair per kernel group.
    Symmetric codes (``zero_point`` None) must lie in [-8, 7], affine codes in [0, 15]. The
    scales are rounded to ``dtype``, the activation dtype the kernel runs in.

    NOTE: 4-bit affine codes keep a zero term ``(8 - zero_point) * scale``, which is rounded
    to ``dtype`` too and adds up to half a bfloat16 step of its size per group.
    """
    if codes.dim() != 2 or not has_int4pack_mm():
        return None
    codes = codes.to(torch.int32)
    zero = torch.zeros_like(scale, dtype=torch.float32)
    if zero_point is None:
        q = codes + 8
    else:
        # Codes of 3 bits or fewer, shifted by their zero_point, fit [-8, 7]; then the kernel's
        # zero term is 0, as for symmetric codes, and no bfloat16 rounding of it adds error.
        q = codes - zero_point.repeat_interleave(group_size, dim=1) + 8
        if int(q.min()) < 0 or int(q.max()) > 15:
            q = codes
            zero = (8 - zero_point.float()) * scale.float()
    if int(q.min()) < 0 or int(q.max()) > 15:
        return None
    try:
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES)
    except (RuntimeError, NotImplementedError):
        return None
    # The kernel reads (in // group_size, out, 2): scale and zero side by side per group.
    scales_and_zeros = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1)
    return Int4PackedWeight(weight, scales_and_zeros.contiguous().to(dtype), group_size)


def int4pack_linear(x: torch.Tensor, packed: Int4PackedWeight) -> torch.Tensor:
    """Multiply ``x`` (in ``packed``'s scale dtype) by the packed weight; no bias is added."""
    output = torch.ops.aten._weight_int4pack_mm_for_cpu(
        kernel_rows(x), packed.weight, packed.group_size, packed.scales_and_zeros
    )
    return output.reshape(*x.shape[:-1], output.shape[-1])
