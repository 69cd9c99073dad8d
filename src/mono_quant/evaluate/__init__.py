"""Compare a float model with its quantized copy: task metrics, model size and output errors."""

from mono_quant.evaluate.compare import compare
from mono_quant.evaluate.errors import sqnr_db
from mono_quant.evaluate.report import ComparisonReport
from mono_quant.evaluate.size import model_size_bytes

__all__ = ["ComparisonReport", "compare", "model_size_bytes", "sqnr_db"]
