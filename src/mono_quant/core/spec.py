"""Quantization specs: what integer grid a tensor is mapped to, and at which granularity.

A spec is a small frozen value object. Granularity decides how many ``scale``/``zero_point``
pairs a tensor gets:

============  =================================================  ============================
granularity   one (scale, zero_point) per                         qparams shape for ``x``
============  =================================================  ============================
per_tensor    the whole tensor                                    ``()``
per_channel   index along ``axis``                                ``(x.shape[axis],)``
per_group     ``group_size`` consecutive elements of a row, where ``(x.shape[0], n_groups)``
              a row is ``x.flatten(1)`` (one output channel)
per_token     row of the last dimension (dynamic activations)     ``x.shape[:-1]``
============  =================================================  ============================

For per_group, a row whose length is not a multiple of ``group_size`` gets a shorter last group.
The zero padding used to compute that group is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_group", "per_token")
MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """Integer quantization grid and granularity for one tensor.

    Symmetric specs use the signed range ``[-2**(bits-1), 2**(bits-1) - 1]`` with zero_point 0;
    affine specs use the unsigned range ``[0, 2**bits - 1]`` with a zero_point on that grid.

    Args:
        bits: integer width, 2 to 8.
        symmetric: symmetric (zero_point 0) or affine (zero_point chosen from the range).
        granularity: ``per_tensor``, ``per_channel``, ``per_group`` or ``per_token``.
        axis: channel axis for ``per_channel``.
        group_size: elements per group for ``per_group``.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "per_tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits} is not supported for integer quantization; use {MIN_BITS} to "
                f"{MAX_BITS}, or a float16/bfloat16 cast for 16-bit weights."
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={self.granularity!r} is not one of {GRANULARITIES}; check the "
                "spelling."
            )
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size <= 0:
                raise ValueError(
                    "granularity='per_group' needs a positive group_size, got "
                    f"{self.group_size!r}; typical values are 32, 64 or 128."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only used with granularity='per_group', not "
                f"{self.granularity!r}; drop it or switch the granularity."
            )

    @property
    def quant_min(self) -> int:
        """Smallest integer on the grid."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        """Largest integer on the grid."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1
