"""Pack low-bit unsigned integer codes into uint8 bytes and unpack them again.

Byte layout: the codes are flattened in row-major (C) order, and each byte contains
``8 // bits`` consecutive codes. Code ``i`` inside a byte occupies bits
``[i * bits, (i + 1) * bits)`` counted from the least significant bit, so at 4 bits
code ``2k`` is the low nibble of byte ``k`` and code ``2k + 1`` the high nibble.
The last byte is padded with zero bits when ``numel * bits`` is not a multiple of 8.

Worked example at 4 bits::

    codes [3, 10]      -> 3 = 0x3 in bits 0-3, 10 = 0xA in bits 4-7 -> byte 0xA3
    codes [3, 10, 7]   -> bytes [0xA3, 0x07]  (the last high nibble is padding)

At 2 bits, codes ``[1, 2, 3, 0]`` pack to ``0b00_11_10_01 = 0x39``.

The codes must be unsigned and lie in ``[0, 2**bits - 1]``. Signed codes (for example
int4 codes in ``[-8, 7]``) must be offset by ``-quant_min`` before packing and shifted
back by ``quant_min`` after unpacking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["SUPPORTED_BITS", "pack_bits", "packed_numel", "unpack_bits"]

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 4, 8)

_CODE_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
)


def _check_bits(bits: int) -> None:
    # bool is a subclass of int, and True == 1 would otherwise pass as bits=1.
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"Invalid bits={bits!r}: packing supports bits in {list(SUPPORTED_BITS)}. "
            "Pick one of these widths."
        )


def _check_numel(numel: int, name: str) -> None:
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise TypeError(f"{name} must be an int, got {type(numel).__name__} ({numel!r}).")
    if numel < 0:
        raise ValueError(f"{name} must be non-negative, got {numel}.")


def _slot_shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Return the bit offset of each code slot inside a byte, as a uint8 tensor."""
    codes_per_byte = 8 // bits
    return torch.arange(codes_per_byte, dtype=torch.uint8, device=device) * bits


def packed_numel(numel: int, bits: int) -> int:
    """Return the number of bytes that ``numel`` codes of ``bits`` bits occupy.

    This is ``ceil(numel * bits / 8)``, including the zero padding in the last byte.
    """
    _check_bits(bits)
    _check_numel(numel, "numel")
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` into a 1-D uint8 tensor, ``8 // bits`` codes per byte.

    Args:
        codes: Integer tensor (uint8, int8, int16, int32 or int64) of any shape, including
            0-d, empty and non-contiguous tensors. Every value must lie in
            ``[0, 2**bits - 1]``.
        bits: Width of one code: 1, 2, 4 or 8.

    Returns:
        A new 1-D uint8 tensor of length ``packed_numel(codes.numel(), bits)`` on the
        device of ``codes``, laid out as the module docstring describes.

    Raises:
        ValueError: If ``bits`` is not supported or a code lies outside
            ``[0, 2**bits - 1]``.
        TypeError: If ``codes`` is not a tensor or has a non-integer dtype.
    """
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}.")
    if codes.dtype not in _CODE_DTYPES:
        allowed = ", ".join(str(dtype) for dtype in _CODE_DTYPES)
        raise TypeError(
            f"codes has dtype {codes.dtype}, but packing needs integer codes ({allowed}). "
            "Quantize floating-point values to integer codes first, and convert bool "
            "masks with .to(torch.uint8)."
        )

    code_max = (1 << bits) - 1
    numel = codes.numel()
    # NOTE: The range check copies min and max to the host, so it synchronizes with a
    # CUDA device once per call.
    if numel > 0:
        found_min, found_max = (value.item() for value in torch.aminmax(codes))
        if found_min < 0 or found_max > code_max:
            raise ValueError(
                f"codes must lie in [0, {code_max}] for bits={bits}, but found "
                f"min={found_min} and max={found_max}. Signed values must be offset by "
                "-quant_min first (codes - quant_min), so that they are unsigned."
            )

    codes_per_byte = 8 // bits
    num_bytes = packed_numel(numel, bits)

    # The range check above makes this cast exact. The zero tail is the padding.
    slots = torch.zeros(num_bytes * codes_per_byte, dtype=torch.uint8, device=codes.device)
    slots[:numel] = codes.reshape(-1).to(torch.uint8)

    # Each code sits in its own bit range, so summing the shifted codes of a byte equals
    # OR-ing them and never carries past 8 bits.
    shifted = slots.view(num_bytes, codes_per_byte) << _slot_shifts(bits, codes.device)
    return shifted.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Unpack bytes written by :func:`pack_bits` into a uint8 tensor of codes.

    Args:
        packed: 1-D uint8 tensor with exactly ``packed_numel(prod(shape), bits)`` bytes.
        bits: Width of one code that ``packed`` was written with: 1, 2, 4 or 8.
        shape: Shape of the original codes. An empty sequence stands for a 0-d tensor.

    Returns:
        A new uint8 tensor of ``shape`` on the device of ``packed``, with the padding
        codes of the last byte dropped. Signed codes need ``+ quant_min`` afterwards.

    Raises:
        ValueError: If ``bits`` is not supported, ``packed`` is not 1-D, ``shape`` has a
            negative size, or the byte count does not match ``shape``.
        TypeError: If ``packed`` is not a uint8 tensor or ``shape`` contains a non-int.
    """
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}.")
    if packed.dtype != torch.uint8:
        raise TypeError(
            f"packed must have dtype torch.uint8, got {packed.dtype}. "
            "Pass the tensor that pack_bits returned."
        )
    if packed.dim() != 1:
        raise ValueError(
            f"packed must be 1-D, got shape {tuple(packed.shape)}. "
            "Pass the tensor that pack_bits returned."
        )

    shape = tuple(shape)
    for size in shape:
        _check_numel(size, f"Each size in shape {shape}")
    numel = math.prod(shape)

    expected_bytes = packed_numel(numel, bits)
    if packed.numel() != expected_bytes:
        raise ValueError(
            f"Invalid byte count for shape {shape} at bits={bits}: expected "
            f"{expected_bytes} bytes (ceil({numel} * {bits} / 8)), got {packed.numel()}. "
            "Pass the same shape and bits that were used with pack_bits."
        )

    code_mask = (1 << bits) - 1
    slots = (packed.unsqueeze(1) >> _slot_shifts(bits, packed.device)) & code_mask
    return slots.reshape(-1)[:numel].reshape(shape)
