"""Input (activation) quantization for quantized layers: none, dynamic or static."""

from __future__ import annotations

from typing import Literal

import torch

from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize
from mono_quant.core.spec import QuantSpec

ActivationMode = Literal["dynamic", "static"]
ACTIVATION_MODES: tuple[str, ...] = ("dynamic", "static")

# Activations use affine int8 because inputs after ReLU or GELU are mostly one-signed, and an
# affine grid spends all 256 levels on the range that actually occurs.
STATIC_SPEC = QuantSpec(bits=8, symmetric=False, granularity="per_tensor")
DYNAMIC_SPEC = QuantSpec(bits=8, symmetric=False, granularity="per_token")


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Round ``x`` onto the int8 grid and return it in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec, x.dtype)


def dynamic_per_token(x: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    """Quantize ``x`` to int8 with qparams computed from ``x`` itself, one pair per token.

    A token is one row of the last dimension. ``per_tensor=True`` uses one pair for the whole
    tensor instead, which convolutions use because their channels sit in dimension 1.
    """
    spec = STATIC_SPEC if per_tensor else DYNAMIC_SPEC
    scale, zero_point = choose_qparams(*min_max(x, spec), spec)
    return quantize_dequantize(x, scale, zero_point, spec)
