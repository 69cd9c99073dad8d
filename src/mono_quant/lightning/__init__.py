"""PyTorch Lightning integration."""

from mono_quant.lightning.callback import QuantizeCallback

__all__ = ["QuantizeCallback"]
