"""mono-quant: model-agnostic quantization for PyTorch, with PyTorch Lightning as its main face.

:func:`quantize` runs prepare, calibrate and convert in one call, optionally under a metric
budget that keeps the most sensitive layers wider; :func:`prepare`,
:func:`calibrate` and :func:`convert` are the separate steps. :func:`compare` runs a torchmetrics
comparison of the float and the quantized model, and :func:`sensitivity` ranks layers by what
quantizing each one costs. :func:`save` and :func:`load` write and read files without running
pickled code, and :func:`export` writes a ``torch.export`` program that runs without mono_quant.
The Lightning callback is in :mod:`mono_quant.lightning`. Inside :func:`reference_kernels`,
quantized layers skip their fast kernels and compute the reference output bit for bit.
"""

from mono_quant.api import quantize
from mono_quant.config import PRESETS, QuantConfig
from mono_quant.core.kernels import reference_kernels
from mono_quant.core.qparams import NonFiniteError
from mono_quant.evaluate import (
    BudgetReport,
    ComparisonReport,
    SensitivityReport,
    budget_report,
    compare,
    model_size_bytes,
    quantize_with_budget,
    sensitivity,
    sqnr_db,
)
from mono_quant.io import export, load, save
from mono_quant.transform import (
    LayerReport,
    QuantizationReport,
    calibrate,
    convert,
    prepare,
    quantization_report,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BudgetReport",
    "ComparisonReport",
    "LayerReport",
    "NonFiniteError",
    "QuantConfig",
    "QuantizationReport",
    "SensitivityReport",
    "__version__",
    "budget_report",
    "calibrate",
    "compare",
    "convert",
    "export",
    "load",
    "model_size_bytes",
    "prepare",
    "quantization_report",
    "quantize",
    "quantize_with_budget",
    "reference_kernels",
    "save",
    "sensitivity",
    "sqnr_db",
]
