"""Map float module types to their quantized counterparts."""

from __future__ import annotations

from torch import nn

from mono_quant.nn.attention import CastMultiheadAttention, QuantMultiheadAttention
from mono_quant.nn.cast import CastLayer
from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from mono_quant.nn.conv_transpose import (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from mono_quant.nn.embedding import QuantEmbedding, QuantEmbeddingBag
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.rnn import QuantGRU, QuantLSTM

# Exact types, not subclasses: a subclass such as MultiheadAttention's out_proj is read by its
# parent through ``.weight``, so swapping it out would break the parent.
QUANTIZED_MODULES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Embedding: QuantEmbedding,
    nn.EmbeddingBag: QuantEmbeddingBag,
    nn.LSTM: QuantLSTM,
    nn.GRU: QuantGRU,
    nn.MultiheadAttention: QuantMultiheadAttention,
}

# 16-bit casts of types whose parents read attributes of them; every other type uses CastLayer.
CAST_MODULES: dict[type[nn.Module], type[CastLayer]] = {
    nn.MultiheadAttention: CastMultiheadAttention,
}


def quantized_counterpart(module: nn.Module) -> type[QuantizedLayer] | None:
    """Return the quantized class for ``module``'s exact type, or ``None`` when there is none."""
    return QUANTIZED_MODULES.get(type(module))


def cast_counterpart(module: nn.Module) -> type[CastLayer]:
    """Return the 16-bit cast class for ``module``: ``CastLayer`` unless a type needs its own."""
    return CAST_MODULES.get(type(module), CastLayer)


def calibrates_input(module: nn.Module) -> bool:
    """Return True when ``module``'s quantized layer can use calibrated static input ranges.

    ``prepare`` should wrap only these layers in an ``ObservedLayer``: the others take integer
    indices (embeddings) or inputs whose ranges an input observer cannot capture (recurrent
    states, attention internals), and a static config quantizes them without calibration.
    """
    quantized_type = quantized_counterpart(module)
    return quantized_type is not None and quantized_type.supports_static
