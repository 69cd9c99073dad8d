"""Keep a dequantized float32 copy of small weights, for calls too small for integer kernels.

On a small call, the fixed cost of a kernel outweighs its arithmetic. Measured at one row on a
2-core AVX512-VNNI CPU (torch 2.13, one thread):

* the fbgemm int8 linear took 13 to 14 us for a 128 -> 10 and for a 512 -> 128 layer, where
  float32 ``F.linear`` took 3 and 6 to 11 us;
* dequantizing a 32x16x3x3 convolution weight on every call took 3 us of a 43 us layer call;
  the float convolution itself took 19 us.

So a layer whose weight has at most :data:`DENSE_MAX_WEIGHT` elements keeps the float32 weight
that :meth:`~mono_quant.nn.quantized.QuantizedLayer.dequantized_weight` returns and runs float
kernels on rounded inputs while a call has at most :data:`DENSE_MAX_MACS` multiply-accumulates.
Weight-only layers use the copy for larger calls too (:func:`weight_only_max_macs`). The
output equals the reference path bit for bit, because the reference dequantizes the same
weight and rounds the input the same way.

NOTE: the copy costs 4 bytes per weight element in memory (256 KiB at most per layer) on top
of the stored codes. ``state_dict`` and saved files keep only the codes.
"""

from __future__ import annotations

import math

# Largest weight, in elements, of which a layer keeps a float32 copy.
DENSE_MAX_WEIGHT = 65_536
# Multiply-accumulates per call up to which float32 kernels on the copy beat the int8 kernels.
# For Linear, fbgemm cost about 13 us plus 1 us per 100k MACs and float32 ``F.linear`` about
# 4 us plus 1 us per 45k MACs (2-core AMD EPYC, one thread), so they cross near 500k MACs.
# NOTE: measured on one machine; other CPUs move the crossover.
DENSE_MAX_MACS = 500_000


# Multiply-accumulates per call up to which the copy also serves weight-only layers on CPUs
# with native bfloat16, where the bfloat16 workspace is the other choice. That matmul pays for
# its fixed cost (about 40-60 us per call) only on large calls. Measured at one thread on
# 512x128, 256x256, 128x512 and 64x1024 weights (Intel Xeon with AMX, torch 2.13). At 128
# rows the copy was ahead or level: 119-197 us against 108-233 us. At 256 rows it was behind
# for all but the 64-input layer: 225-333 us against 154-193 us.
DENSE_WEIGHT_ONLY_MAX_MACS = 8 * 1024 * 1024


def dense_applies(weight_numel: int, macs: int, max_macs: float = DENSE_MAX_MACS) -> bool:
    """Return True when a weight of ``weight_numel`` elements serves ``macs`` from its copy.

    Weight-only layers pass a larger ``max_macs`` (:func:`weight_only_max_macs`): for them the
    copy runs the float model's own kernel, so only a faster matmul can beat it.
    """
    return weight_numel <= DENSE_MAX_WEIGHT and macs <= max_macs


def weight_only_max_macs(bfloat16_workspace: bool) -> float:
    """Return the MAC limit of the copy for a weight-only layer.

    Without the bfloat16 workspace, no kernel beats float32 ``F.linear`` on a weight this
    small, whatever the size of the call. With it, the copy serves calls up to
    :data:`DENSE_WEIGHT_ONLY_MAX_MACS`.
    """
    return DENSE_WEIGHT_ONLY_MAX_MACS if bfloat16_workspace else math.inf
