"""Quantized ``nn.ConvTranspose1d``, ``nn.ConvTranspose2d`` and ``nn.ConvTranspose3d``.

A transposed convolution stores its weight as ``(in_channels, out_channels / groups, *kernel)``,
so its output channels sit along dim 1. Per-channel scales are therefore taken along axis 1.

``forward`` dequantizes 8-bit weights into a reused buffer and runs the float transposed
convolution on the rounded input, which equals ``forward_reference`` bit for bit. torch 2.13
has no int8 transposed convolution that returns float32 (``quantized::conv_transpose2d``
requantizes its output to 8 bits), so there is no integer path. Inputs the workspace path does
not cover take ``forward_reference``; :meth:`_QuantConvTransposeNd.kernel_for` names the path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.fastpath import (
    BufferPlan,
    dequantize_factors,
    dequantize_into,
    dequantize_into_supported,
    fast_paths_enabled,
    per_tensor_qparams,
    round_to_grid,
    static_input_grid,
    workspace,
)
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import STATIC_SPEC, ActivationMode
from mono_quant.nn.quantized import (
    QParams,
    QuantizedLayer,
    container_bits,
    names_layer_in_input_errors,
)

# Input grid of quantize_input(x, per_tensor=True): static and dynamic inputs both use it.
INPUT_SPEC = STATIC_SPEC
# Input dtypes whose workspace dequantization rounds exactly like dequantize(); float64 would
# multiply in float64 where the reference rounds the product to float32 first.
WORKSPACE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _QuantConvTransposeNd(QuantizedLayer):
    """Transposed convolution with an integer weight; floats in, floats out.

    NOTE: with ``groups > 1`` dim 1 has ``out_channels / groups`` entries, so each per-channel
    scale covers the output channel at the same position in every group. A depthwise transposed
    convolution (``out_channels == groups``) therefore gets a single scale; use per_group for
    finer scales there. per_group splits each row of dim 0 (one input channel) into groups.

    Dynamic activations use one (scale, zero_point) per input tensor, as for convolutions.
    """

    _conv: ClassVar[Callable[..., torch.Tensor]]
    _float_type: ClassVar[type[nn.Module]]
    _spatial_dims: ClassVar[int]

    def __init__(
        self,
        module: nn.modules.conv._ConvTransposeNd,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | None = None,
    ) -> None:
        output_axes = (1, 1 - module.weight.dim())
        if weight_spec.granularity == "per_channel" and weight_spec.axis not in output_axes:
            raise ValueError(
                f"{type(self).__name__} keeps output channels in dim 1 of its weight, so "
                f"per_channel needs axis=1, got axis={weight_spec.axis}; build the spec with "
                f"{type(self).__name__}.layer_spec(spec)."
            )
        super().__init__(
            module.weight, weight_spec, module.bias, activations, input_qparams, weight_qparams
        )
        self.in_channels = module.in_channels
        self.out_channels = module.out_channels
        self.kernel_size = module.kernel_size
        self.stride = module.stride
        self.padding = module.padding
        self.output_padding = module.output_padding
        self.dilation = module.dilation
        self.groups = module.groups
        self.padding_mode = module.padding_mode

    @classmethod
    def layer_spec(cls, spec: QuantSpec) -> QuantSpec:
        """Return ``spec`` with per_channel scales moved to the output-channel axis 1."""
        if spec.granularity == "per_channel":
            return dataclasses.replace(spec, axis=1)
        return spec

    @classmethod
    def from_float(
        cls,
        module: nn.modules.conv._ConvTransposeNd,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | None = None,
    ) -> _QuantConvTransposeNd:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        A per_channel ``weight_spec`` with axis 0 (the default of ``QuantConfig``) is moved to
        axis 1, the output channels of a transposed convolution.
        """
        if type(module) is not cls._float_type:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._float_type.__name__}, got "
                f"{type(module).__name__}."
            )
        if weight_spec.granularity == "per_channel" and weight_spec.axis == 0:
            weight_spec = cls.layer_spec(weight_spec)
        return cls(module, weight_spec, activations, input_qparams, weight_qparams)

    def _output_padding_for(self, x: torch.Tensor, output_size: list[int] | None) -> list[int]:
        # The float layer's helper reads only ``self.output_padding`` and its arguments, so it
        # validates output_size with torch's own messages.
        return nn.modules.conv._ConvTransposeNd._output_padding(
            self,  # type: ignore[arg-type]
            x,
            output_size,
            list(self.stride),
            list(self.padding),
            list(self.kernel_size),
            self._spatial_dims,
            list(self.dilation),
        )

    # ---- fast path ----------------------------------------------------------------------

    def _plan(self) -> _TransposePlan:
        return self._buffer_plan(self.buffer_sources(), _TransposePlan)

    def _workspace_plan(self, x: torch.Tensor) -> _TransposePlan | None:
        if not fast_paths_enabled(x) or x.dtype not in WORKSPACE_DTYPES:
            return None
        plan = self._plan()
        return plan if plan.workspace else None

    def kernel_for(self, x: torch.Tensor) -> str:
        """Return the path ``forward`` takes for ``x``: ``workspace`` or ``reference``."""
        return "reference" if self._workspace_plan(x) is None else "workspace"

    @names_layer_in_input_errors
    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        plan = self._workspace_plan(x)
        if plan is None:
            return self.forward_reference(x, output_size)
        output_padding = self._output_padding_for(x, output_size)
        if plan.static_grid is not None:
            scale, _, low, high = plan.static_grid
            x = round_to_grid(x, scale, low, high)
        elif self.activations == "dynamic":
            scale, zero_point = per_tensor_qparams(x, INPUT_SPEC)
            low, high = INPUT_SPEC.quant_min - zero_point, INPUT_SPEC.quant_max - zero_point
            x = round_to_grid(x, scale, float(low), float(high))
        codes = plan.sources[0]
        weight = workspace(codes.shape, x.dtype, codes.device)
        dequantize_into(weight, codes, *plan.factors)
        bias = plan.sources[3]
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return type(self)._conv(
            x,
            weight,
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )

    def forward_reference(
        self, x: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        """Compute the output by dequantizing the whole weight."""
        output_padding = self._output_padding_for(x, output_size)
        x = self.quantize_input(x, per_tensor=True)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return type(self)._conv(
            x,
            self.dequantized_weight(x.dtype),
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class _TransposePlan(BufferPlan):
    """Per-layer state that the workspace path reuses across calls; see :class:`BufferPlan`."""

    def __init__(
        self, layer: _QuantConvTransposeNd, sources: tuple[torch.Tensor | None, ...]
    ) -> None:
        super().__init__(sources)
        spec = layer.weight_spec
        codes, scale, zero_point = sources[:3]
        shape = tuple(codes.shape) if container_bits(spec.bits) == 8 else ()
        self.workspace = dequantize_into_supported(spec, shape)
        self.factors = dequantize_factors(scale, zero_point, spec, shape) if self.workspace else ()
        self.static_grid: tuple[torch.Tensor, ...] | None = None
        if layer.activations == "static":
            self.static_grid = static_input_grid(sources[4], sources[5], INPUT_SPEC)


class QuantConvTranspose1d(_QuantConvTransposeNd):
    """Quantized ``nn.ConvTranspose1d``."""

    _conv = staticmethod(F.conv_transpose1d)
    _float_type = nn.ConvTranspose1d
    _spatial_dims = 1


class QuantConvTranspose2d(_QuantConvTransposeNd):
    """Quantized ``nn.ConvTranspose2d``."""

    _conv = staticmethod(F.conv_transpose2d)
    _float_type = nn.ConvTranspose2d
    _spatial_dims = 2


class QuantConvTranspose3d(_QuantConvTransposeNd):
    """Quantized ``nn.ConvTranspose3d``."""

    _conv = staticmethod(F.conv_transpose3d)
    _float_type = nn.ConvTranspose3d
    _spatial_dims = 3
