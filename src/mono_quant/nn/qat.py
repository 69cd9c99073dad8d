"""QAT modules: float layers whose weights (and inputs) pass through ``FakeQuantize``.

Each class subclasses its float type and takes over the float module's ``weight`` and ``bias``
Parameter objects, so optimizers, pruning and other code that hold those Parameters keep
working. ``forward`` has the float signature; nothing is patched on the original module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import fake_quantize
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import DYNAMIC_SPEC, STATIC_SPEC, ActivationMode, dynamic_spec
from mono_quant.nn.fake_quant import FakeQuantize


def bn_fold_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Return ``gamma / sqrt(running_var + eps)``, the per-channel scale that folding applies."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def _adopt(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` the attributes, Parameters and buffers of ``source`` (same objects)."""
    for key, value in vars(source).items():
        if key not in ("_parameters", "_buffers", "_modules", "training"):
            target.__dict__[key] = value
    target.__dict__["_parameters"] = dict(source._parameters)
    target.__dict__["_buffers"] = dict(source._buffers)
    target.__dict__["_modules"] = dict(source._modules)
    target.training = source.training


class _QATMixin:
    """Shared set-up for QAT layers: a weight quantizer and an optional input quantizer."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: FakeQuantize | None
    activations: ActivationMode | None
    # Linear layers get one scale per token; convolutions one per tensor (channels sit in dim 1).
    _dynamic_spec: QuantSpec = DYNAMIC_SPEC

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_fake_quant: FakeQuantize,
        activations: ActivationMode | None = None,
        input_fake_quant: FakeQuantize | None = None,
    ) -> Any:
        """Wrap ``module``'s Parameters; ``module`` itself is not modified."""
        layer = cls.__new__(cls)
        _adopt(layer, module)
        layer._init_quantizers(weight_fake_quant, activations, input_fake_quant)
        return layer

    def _init_quantizers(
        self,
        weight_fake_quant: FakeQuantize,
        activations: ActivationMode | None,
        input_fake_quant: FakeQuantize | None,
    ) -> None:
        self.weight_fake_quant = weight_fake_quant
        self.activations = activations
        self.input_fake_quant = input_fake_quant

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input per the activation mode (dynamic: qparams computed per call).

        Dynamic inputs of Linear layers follow ``activation_granularity`` when the layer has
        one, else ``"per_token"``, the default of ``QuantLinear``. Either way they round as
        the converted layer will. Convolutions use one 8-bit pair per tensor.
        """
        if self.activations == "static" and self.input_fake_quant is not None:
            return self.input_fake_quant(x)
        if self.activations == "dynamic" and bool(self.weight_fake_quant.fake_quant_enabled):
            spec = self._dynamic_spec
            if spec.granularity == "per_token":
                spec = dynamic_spec(getattr(self, "activation_granularity", "per_token"))
            with torch.no_grad():
                scale, zero_point = choose_qparams(*min_max(x, spec), spec)
            return fake_quantize(x, scale, zero_point, spec)
        return x


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input, sharing the float layer's Parameters."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight_fake_quant(self.weight)
        return F.linear(self.quantize_input(input), weight, self.bias)


class _QATConvNd(_QATMixin):
    """Shared forward of the QAT convolutions."""

    _dynamic_spec = STATIC_SPEC

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight_fake_quant(self.weight)
        return self._conv_forward(self.quantize_input(input), weight, self.bias)  # type: ignore[attr-defined]


class QATConv1d(_QATConvNd, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""


class QATConv2d(_QATConvNd, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""


class QATConv3d(_QATConvNd, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input."""


class _QATConvBnNd(_QATConvNd):
    """Convolution followed by batch norm, trained with the weight folded as it will be deployed.

    In training mode the weight is scaled by ``gamma / sqrt(running_var + eps)`` before fake
    quantization, the scaling is undone on the output, and the batch norm then normalizes with
    batch statistics as usual. In eval mode, or once ``freeze_bn`` is set, the folded weight and
    bias are used directly with running statistics, exactly as the converted layer computes.
    A channel whose batch-norm weight is zero keeps its unscaled weight in training and outputs
    the batch-norm bias, so no division by zero occurs.
    """

    bn: nn.modules.batchnorm._BatchNorm

    @classmethod
    def from_conv_bn(
        cls,
        conv: nn.modules.conv._ConvNd,
        bn: nn.modules.batchnorm._BatchNorm,
        weight_fake_quant: FakeQuantize,
        activations: ActivationMode | None = None,
        input_fake_quant: FakeQuantize | None = None,
    ) -> Any:
        """Wrap ``conv``'s and ``bn``'s Parameters and buffers; neither module is modified."""
        layer = cls.from_float(conv, weight_fake_quant, activations, input_fake_quant)
        layer.bn = bn
        layer.register_buffer("freeze_bn", torch.zeros((), dtype=torch.uint8))
        return layer

    def _channel_view(self, values: torch.Tensor, dims: int) -> torch.Tensor:
        return values.reshape(-1, *([1] * (dims - 1)))

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the weight and bias of the conv with the batch norm's running stats folded in."""
        bn = self.bn
        factor = bn_fold_factor(bn)
        weight = self.weight * self._channel_view(factor, self.weight.dim())
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        return weight, bn.bias + (bias - bn.running_mean) * factor

    def _refresh_bn(self, x: torch.Tensor) -> None:
        # The folded weight reads the batch norm's parameters outside its forward. Pre-hooks that
        # recompute them (torch.nn.utils.prune, used by ModelPruning) must run first, or a stale
        # tensor from the previous step's graph would be used.
        for hook in self.bn._forward_pre_hooks.values():
            hook(self.bn, (x,))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(input)
        self._refresh_bn(x)
        if not (self.training and self.bn.training) or bool(self.freeze_bn):
            weight, bias = self.folded_weight_and_bias()
            return self._conv_forward(x, self.weight_fake_quant(weight), bias)  # type: ignore[attr-defined]

        bn = self.bn
        factor = bn_fold_factor(bn)
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        weight = self.weight * self._channel_view(safe, self.weight.dim())
        out = self._conv_forward(x, self.weight_fake_quant(weight), None)  # type: ignore[attr-defined]
        out = out / self._channel_view(safe, out.dim() - 1).unsqueeze(0)
        if self.bias is not None:
            out = out + self._channel_view(self.bias, out.dim() - 1).unsqueeze(0)
        return bn(out)


class QATConvBn1d(_QATConvBnNd, nn.Conv1d):
    """``nn.Conv1d`` + ``nn.BatchNorm1d`` trained folded."""


class QATConvBn2d(_QATConvBnNd, nn.Conv2d):
    """``nn.Conv2d`` + ``nn.BatchNorm2d`` trained folded."""


class QATConvBn3d(_QATConvBnNd, nn.Conv3d):
    """``nn.Conv3d`` + ``nn.BatchNorm3d`` trained folded."""


CONV_BN_PATTERNS: dict[tuple[type[nn.Module], type[nn.Module]], type[nn.Module]] = {
    (nn.Conv1d, nn.BatchNorm1d): QATConvBn1d,
    (nn.Conv2d, nn.BatchNorm2d): QATConvBn2d,
    (nn.Conv3d, nn.BatchNorm3d): QATConvBn3d,
}

QAT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Conv3d: QATConv3d,
}
