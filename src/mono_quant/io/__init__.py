"""Saving, loading and exporting quantized models."""

from mono_quant.io.export import export
from mono_quant.io.load import (
    load,
    load_quantized_state_dict,
    quantized_layer_names,
    rebuild_quantized_layers,
)
from mono_quant.io.read import load_weights_only, read_artifact
from mono_quant.io.save import ARTIFACT_FORMAT, ARTIFACT_VERSION, quantization_header, save

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "export",
    "load",
    "load_quantized_state_dict",
    "load_weights_only",
    "quantization_header",
    "quantized_layer_names",
    "read_artifact",
    "rebuild_quantized_layers",
    "save",
]
