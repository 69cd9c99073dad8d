"""Quantized and calibration modules built on the core."""

from mono_quant.nn.cast import CastLayer
from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.observed import ObservedLayer
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import QUANTIZED_MODULES, quantized_counterpart

__all__ = [
    "QUANTIZED_MODULES",
    "CastLayer",
    "ObservedLayer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QuantizedLayer",
    "quantized_counterpart",
]
