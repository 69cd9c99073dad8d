"""Model transforms: select layers, prepare, calibrate and convert any ``nn.Module``."""

from mono_quant.transform.calibrate import calibrate
from mono_quant.transform.convert import convert
from mono_quant.transform.prepare import prepare
from mono_quant.transform.quantize import quantize
from mono_quant.transform.report import LayerReport, QuantizationReport
from mono_quant.transform.state import quantization_report

__all__ = [
    "LayerReport",
    "QuantizationReport",
    "calibrate",
    "convert",
    "prepare",
    "quantization_report",
    "quantize",
]
