"""Weight-only int8 linear through ``aten._weight_int8pack_mm``, with a reference fallback.

The reference path dequantizes the weight into the activation dtype and calls ``F.linear``. For
a 4096x4096 layer on a 2-core x86-64 CPU with torch 2.13, ``aten._weight_int8pack_mm`` was 1.9x
to 3.1x faster with bfloat16 activations and 1 to 8 rows. With float32 activations it was 7x
slower than float32 ``F.linear``, and at 64 rows it was no faster, so :func:`int8pack_applies`
sends those inputs to the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Rows (tokens, batch items) up to which the int8 weight-only kernel beats dequantize + F.linear
# for bfloat16/float16 inputs.
# NOTE: measured on one 2-core x86-64 CPU; other machines may move the crossover.
INT8PACK_MAX_ROWS = 32
# The same for float32 inputs, which are cast to bfloat16 for the kernel. For a 4096x4096 layer
# (2 threads, AMD EPYC with AVX-512 VNNI/BF16, torch 2.13) the kernel took 14.2 / 27.4 / 40.5
# ms at 64 / 128 / 192 rows, the float32 workspace path 18.5 / 29.0 / 38.7 ms.
INT8PACK_MAX_ROWS_FLOAT32 = 128
# The same for weight-only layers on CPUs with native bfloat16, where the bfloat16 workspace
# takes the rows above it. Measured on 768x768, 1024x4096, 4096x1024 and 4096x4096 layers, 1
# and 2 threads (Intel Xeon with AMX, torch 2.13), against the workspace of int8 codes whose
# scale multiplies the output. The kernel took 0.18x to 0.28x of the workspace's time at 1
# row, 0.59x to 0.78x at 8, 0.78x to 1.10x at 12 and 0.98x to 1.41x at 16.
INT8PACK_MAX_ROWS_NATIVE_BF16 = 12
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# Byte alignment of fresh CPU allocations in torch, which the kernel's vector loads rely on.
_KERNEL_ALIGNMENT = 64


@functools.cache
def has_int8pack_mm() -> bool:
    """Return True when ``aten._weight_int8pack_mm`` exists and runs in this torch build."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16)
        weight = torch.ones(8, 32, dtype=torch.int8)
        torch.ops.aten._weight_int8pack_mm(x, weight, torch.ones(8, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def int8pack_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Return True when the int8 weight-only kernel is the faster correct path for ``x``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.dtype in _HALF_DTYPES
        and weight.dtype == torch.int8
        and x.device == weight.device
        and 0 < rows <= INT8PACK_MAX_ROWS
        # The AVX-512 kernel reads 16 features per step with aligned loads and no tail loop.
        and x.shape[-1] % 16 == 0
        and has_int8pack_mm()
    )


def int8_weight_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Compute ``F.linear(x, weight * scale[:, None], bias)`` by dequantizing in ``x``'s dtype."""
    dequantized = (weight.to(torch.float32) * scale.unsqueeze(1)).to(x.dtype)
    return F.linear(x, dequantized, None if bias is None else bias.to(x.dtype))


def int8_weight_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Compute a linear layer with symmetric per-channel int8 ``weight`` of shape (out, in).

    Uses ``aten._weight_int8pack_mm`` when :func:`int8pack_applies`, otherwise the reference.
    """
    if not int8pack_applies(x, weight):
        return int8_weight_linear_reference(x, weight, scale, bias)

    out = int8pack_mm(x, weight, scale.to(x.dtype))
    return out if bias is None else out + bias.to(x.dtype)


def kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a contiguous 2-D tensor whose data starts on a fresh allocation boundary.

    The AVX-512 kernels read rows with aligned loads and crash on a view that starts inside a
    larger buffer, so such inputs are copied into a fresh allocation.
    """
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.data_ptr() % _KERNEL_ALIGNMENT:
        rows = rows.clone()
    return rows


def int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return ``x @ (weight * scale[:, None]).T`` from the kernel, in ``x``'s dtype; no bias."""
    out = torch.ops.aten._weight_int8pack_mm(kernel_rows(x), weight, scale)
    return out.reshape(*x.shape[:-1], weight.shape[0])
