"""Map float module types to their quantized counterparts."""

from __future__ import annotations

from torch import nn

from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.quantized import QuantizedLayer

# Exact types, not subclasses: a subclass such as MultiheadAttention's out_proj is read by its
# parent through ``.weight``, so swapping it out would break the parent.
QUANTIZED_MODULES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}


def quantized_counterpart(module: nn.Module) -> type[QuantizedLayer] | None:
    """Return the quantized class for ``module``'s exact type, or ``None`` when there is none."""
    return QUANTIZED_MODULES.get(type(module))
