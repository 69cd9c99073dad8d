"""PyTorch Lightning integration."""

from mono_quant.lightning.callback import QuantizeCallback
from mono_quant.lightning.qat import load_qat_checkpoint

__all__ = ["QuantizeCallback", "load_qat_checkpoint"]
