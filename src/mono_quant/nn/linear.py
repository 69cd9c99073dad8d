"""Quantized ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.kernels import int8_weight_linear
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.quantized import QuantizedLayer, container_bits


class QuantLinear(QuantizedLayer):
    """``nn.Linear`` with an integer weight; floats in, floats out."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(weight, weight_spec, bias, activations, input_qparams, weight_qparams)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> QuantLinear:
        """Build a quantized copy of ``module``; the float module is left unchanged."""
        return cls(
            module.weight, module.bias, weight_spec, activations, input_qparams, weight_qparams
        )

    def _uses_int8_kernel_layout(self) -> bool:
        spec = self.weight_spec
        return (
            spec.symmetric
            and container_bits(spec.bits) == 8
            and (
                spec.granularity == "per_tensor"
                or (spec.granularity == "per_channel" and spec.axis in (0, -2))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self._uses_int8_kernel_layout():
            scale = self.weight_scale.expand(self.out_features)
            return int8_weight_linear(x, self.weight_codes, scale, self.bias)
        return self.forward_reference(x, quantize_input=False)

    def forward_reference(self, x: torch.Tensor, quantize_input: bool = True) -> torch.Tensor:
        """Compute the output by dequantizing the whole weight; every fast path must match it."""
        if quantize_input:
            x = self.quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)
