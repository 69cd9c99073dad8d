"""Compare a float model with its quantized copy: task metrics, model size and output errors."""

from mono_quant.evaluate.budget import (
    BudgetReport,
    LayerMove,
    budget_report,
    quantize_with_budget,
)
from mono_quant.evaluate.compare import compare
from mono_quant.evaluate.errors import sqnr_db
from mono_quant.evaluate.report import ComparisonReport
from mono_quant.evaluate.sensitivity import LayerSensitivity, SensitivityReport, sensitivity
from mono_quant.evaluate.size import model_size_bytes

__all__ = [
    "BudgetReport",
    "ComparisonReport",
    "LayerMove",
    "LayerSensitivity",
    "SensitivityReport",
    "budget_report",
    "compare",
    "model_size_bytes",
    "quantize_with_budget",
    "sensitivity",
    "sqnr_db",
]
