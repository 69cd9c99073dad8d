"""Quantized and calibration modules built on the core."""

from mono_quant.nn.attention import (
    CastMultiheadAttention,
    QuantMultiheadAttention,
    disable_fused_transformer_paths,
)
from mono_quant.nn.cast import CastLayer
from mono_quant.nn.chain import QuantSequential, plan_int8_chains
from mono_quant.nn.conv import QuantConv1d, QuantConv2d, QuantConv3d
from mono_quant.nn.conv_transpose import (
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from mono_quant.nn.embedding import QuantEmbedding, QuantEmbeddingBag
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.observed import ObservedLayer
from mono_quant.nn.parametrized import (
    CastParameter,
    QuantizedParameter,
    quantize_parameter,
    share_parameter,
)
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import (
    CAST_MODULES,
    QUANTIZED_MODULES,
    calibrates_input,
    cast_counterpart,
    quantized_counterpart,
)
from mono_quant.nn.rnn import QuantGRU, QuantLSTM

__all__ = [
    "CAST_MODULES",
    "QUANTIZED_MODULES",
    "CastLayer",
    "CastMultiheadAttention",
    "CastParameter",
    "ObservedLayer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantEmbedding",
    "QuantEmbeddingBag",
    "QuantGRU",
    "QuantLSTM",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSequential",
    "QuantizedLayer",
    "QuantizedParameter",
    "calibrates_input",
    "cast_counterpart",
    "disable_fused_transformer_paths",
    "plan_int8_chains",
    "quantize_parameter",
    "quantized_counterpart",
    "share_parameter",
]
