"""Saving and reading quantized models."""

from mono_quant.io.read import read_artifact
from mono_quant.io.save import ARTIFACT_FORMAT, ARTIFACT_VERSION, save

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "read_artifact", "save"]
