"""Fast matmul kernels from torch core, each behind a feature check with a reference fallback.

One module per kernel family:

* :mod:`~mono_quant.core.kernels.fbgemm`: int8 x int8 on x86 CPUs, for quantized inputs.
* :mod:`~mono_quant.core.kernels.int8pack`: weight-only int8 with bfloat16/float16 inputs.
* :mod:`~mono_quant.core.kernels.int4pack`: weight-only int4 (and 2/3-bit) with bfloat16 inputs.
* :mod:`~mono_quant.core.kernels.workspace`: dequantize into a reused buffer for many rows.

:mod:`~mono_quant.core.kernels.mode` holds the switch that forces the reference path, and
:mod:`~mono_quant.core.kernels.cache` the cache of prepacked weights. The layers choose a path
per call; ``QuantLinear.kernel_for`` names the one it takes.
"""

from mono_quant.core.kernels.int8pack import (
    INT8PACK_MAX_ROWS,
    has_int8pack_mm,
    int8_weight_linear,
    int8_weight_linear_reference,
    int8pack_applies,
)
from mono_quant.core.kernels.mode import fast_kernels_enabled, reference_kernels

__all__ = [
    "INT8PACK_MAX_ROWS",
    "fast_kernels_enabled",
    "has_int8pack_mm",
    "int8_weight_linear",
    "int8_weight_linear_reference",
    "int8pack_applies",
    "reference_kernels",
]
