"""Input (activation) quantization for quantized layers: none, dynamic or static."""

from __future__ import annotations

from typing import Literal

import torch

from mono_quant.core.fastpath import per_tensor_qparams as fast_per_tensor_qparams
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize
from mono_quant.core.spec import QuantSpec

ActivationMode = Literal["dynamic", "static"]
ACTIVATION_MODES: tuple[str, ...] = ("dynamic", "static")
ActivationGranularity = Literal["per_tensor", "per_token"]
ACTIVATION_GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_token")

# Activations use affine int8 because inputs after ReLU or GELU are mostly one-signed, and an
# affine grid spends all 256 levels on the range that actually occurs.
STATIC_SPEC = QuantSpec(bits=8, symmetric=False, granularity="per_tensor")
DYNAMIC_SPEC = QuantSpec(bits=8, symmetric=False, granularity="per_token")
# Dynamic per_tensor activations use the 7-bit grid [0, 127] on every machine. The fbgemm
# u8 x s8 kernels add pairs of products in int16, which saturates for codes above 127 on CPUs
# without VNNI; with 7 bits the fast path and the reference agree everywhere.
DYNAMIC_PER_TENSOR_SPEC = QuantSpec(bits=7, symmetric=False, granularity="per_tensor")


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Round ``x`` onto the int8 grid and return it in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec, x.dtype)


def dynamic_spec(granularity: str) -> QuantSpec:
    """Return the spec of dynamic activations with ``granularity`` ``per_tensor`` or ``per_token``.

    Raises:
        ValueError: when ``granularity`` is not one of those two.
    """
    if granularity == "per_tensor":
        return DYNAMIC_PER_TENSOR_SPEC
    if granularity == "per_token":
        return DYNAMIC_SPEC
    raise ValueError(
        f"activation_granularity={granularity!r} is not one of {ACTIVATION_GRANULARITIES}."
    )


def dynamic_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round ``x`` onto ``spec``'s grid with qparams computed from ``x`` itself."""
    scale, zero_point = choose_qparams(*min_max(x, spec), spec)
    return quantize_dequantize(x, scale, zero_point, spec)


def per_tensor_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[float, int]:
    """Return the per_tensor ``(scale, zero_point)`` of ``x`` as Python numbers.

    The values equal ``choose_qparams(*min_max(x, spec), spec)`` exactly. Affine specs take the
    fast Python-float arithmetic of :func:`mono_quant.core.fastpath.per_tensor_qparams`;
    symmetric specs go through ``choose_qparams``.
    """
    if spec.symmetric:
        scale, zero_point = choose_qparams(*min_max(x, spec), spec)
        return float(scale), int(zero_point)
    return fast_per_tensor_qparams(x, spec)


def dynamic_per_token(x: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    """Quantize ``x`` to int8 with qparams computed from ``x`` itself, one pair per token.

    A token is one row of the last dimension. ``per_tensor=True`` uses one 8-bit pair for the
    whole tensor instead, which convolutions use because their channels sit in dimension 1.
    """
    return dynamic_quantize(x, STATIC_SPEC if per_tensor else DYNAMIC_SPEC)
