"""Quantized ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.quantized import QuantizedLayer


class _QuantConvNd(QuantizedLayer):
    """Convolution with an integer weight; the float hyper-parameters are copied unchanged.

    Dynamic activations use one (scale, zero_point) per input tensor, because a convolution's
    channels sit in dimension 1 rather than the last dimension that per-token quantization uses.
    """

    _conv: ClassVar[Callable[..., torch.Tensor]]
    _float_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        module: nn.modules.conv._ConvNd,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(
            module.weight, weight_spec, module.bias, activations, input_qparams, weight_qparams
        )
        self.in_channels = module.in_channels
        self.out_channels = module.out_channels
        self.kernel_size = module.kernel_size
        self.stride = module.stride
        self.padding = module.padding
        self.dilation = module.dilation
        self.groups = module.groups
        self.padding_mode = module.padding_mode
        self._reversed_padding_repeated_twice = list(module._reversed_padding_repeated_twice)

    @classmethod
    def from_float(
        cls,
        module: nn.modules.conv._ConvNd,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> _QuantConvNd:
        """Build a quantized copy of ``module``; the float module is left unchanged."""
        if type(module) is not cls._float_type:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._float_type.__name__}, got "
                f"{type(module).__name__}."
            )
        return cls(module, weight_spec, activations, input_qparams, weight_qparams)

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return type(self)._conv(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the output by dequantizing the whole weight."""
        x = self.quantize_input(x, per_tensor=True)
        return self._convolve(x, self.dequantized_weight(x.dtype))


class QuantConv1d(_QuantConvNd):
    """Quantized ``nn.Conv1d``."""

    _conv = staticmethod(F.conv1d)
    _float_type = nn.Conv1d


class QuantConv2d(_QuantConvNd):
    """Quantized ``nn.Conv2d``."""

    _conv = staticmethod(F.conv2d)
    _float_type = nn.Conv2d


class QuantConv3d(_QuantConvNd):
    """Quantized ``nn.Conv3d``."""

    _conv = staticmethod(F.conv3d)
    _float_type = nn.Conv3d
