"""Quantized ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.

``forward`` picks one of four paths per call (:meth:`_QuantConvNd.kernel_for` names it):

* ``"int8"``: static or dynamic inputs on a VNNI CPU, for calls large enough to pay for the
  kernel's set-up: the input is rounded to uint8 codes and a oneDNN int8 convolution with a
  prepacked weight returns float32 (see :mod:`mono_quant.core.conv_kernels`);
* ``"dense"``: float32 inputs to a layer with a small weight (see
  :mod:`mono_quant.core.kernels.dense`): a float convolution with a kept float32 copy of the
  dequantized weight runs on the rounded input. It equals ``forward_reference`` bit for bit;
* ``"workspace"``: the weight is dequantized into a reused buffer and a float convolution runs
  on the rounded input. It equals ``forward_reference`` bit for bit;
* ``"reference"``: ``forward_reference``, for everything else (codes below 8 bits, float64,
  non-CPU devices, autograd, ``torch.compile`` and ``torch.export``, and
  ``MONO_QUANT_KERNELS=reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core import conv_kernels
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
from mono_quant.core.kernels.dense import DENSE_MAX_WEIGHT
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import STATIC_SPEC, ActivationMode
from mono_quant.nn.quantized import QuantizedLayer, container_bits, names_layer_in_input_errors

# Input grid of quantize_input(x, per_tensor=True): static and dynamic inputs both use it.
INPUT_SPEC = STATIC_SPEC
# Input dtypes whose workspace dequantization rounds exactly like dequantize(); float64 would
# multiply in float64 where the reference rounds the product to float32 first.
WORKSPACE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        bias = self._buffers["bias"]
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return type(self)._conv(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    # ---- fast paths ---------------------------------------------------------------------

    def _plan(self) -> _FastPlan:
        return self._buffer_plan(self.buffer_sources(), _FastPlan)

    def _choose(self, x: torch.Tensor) -> tuple[str, _FastPlan | None]:
        if not fast_paths_enabled(x) or x.dtype not in WORKSPACE_DTYPES:
            return "reference", None
        plan = self._plan()
        if (
            plan.int8
            and x.dtype == torch.float32
            and x.dim() == plan.dims
            and conv_kernels.int8_conv_pays_off(
                x.shape, self.out_channels, self.weight_shape, self.stride
            )
        ):
            return "int8", plan
        if plan.dense and x.dtype == torch.float32:
            return "dense", plan
        if not plan.workspace:
            return "reference", None
        return "workspace", plan

    def kernel_for(self, x: torch.Tensor) -> str:
        """Return the path ``forward`` takes for ``x``: ``int8``, ``dense``, ``workspace`` or
        ``reference``."""
        return self._choose(x)[0]

    def _round_input(self, plan: _FastPlan, x: torch.Tensor) -> torch.Tensor:
        if plan.static_grid is not None:
            scale, _, low, high = plan.static_grid
            return round_to_grid(x, scale, low, high)
        scale, zero_point = per_tensor_qparams(x, INPUT_SPEC)
        low, high = INPUT_SPEC.quant_min - zero_point, INPUT_SPEC.quant_max - zero_point
        return round_to_grid(x, scale, float(low), float(high))

    def _forward_workspace(self, plan: _FastPlan, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = self._round_input(plan, x)
        codes = plan.sources[0]
        weight = workspace(codes.shape, x.dtype, codes.device)
        return self._convolve(x, dequantize_into(weight, codes, *plan.factors))

    def _forward_dense(self, plan: _FastPlan, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = self._round_input(plan, x)
        return self._convolve(x, plan.dense_weight(self))

    def _forward_int8(self, plan: _FastPlan, x: torch.Tensor) -> torch.Tensor:
        if plan.static_qparams is not None:
            scale, zero_point = plan.static_qparams
            scale_operand, zero_point_operand = plan.static_grid[:2]  # type: ignore[index]
        else:
            scale, zero_point = per_tensor_qparams(x, INPUT_SPEC)
            scale_operand, zero_point_operand = scale, float(zero_point)
        source = x
        if plan.pad_input:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            source = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        packed, weight_scale = plan.packed_weight(self)
        bias = plan.sources[3]
        output = conv_kernels.int8_conv(
            conv_kernels.input_codes(source, scale_operand, zero_point_operand),
            scale,
            zero_point,
            packed,
            weight_scale,
            None if bias is None else bias.float(),
            self.stride,
            plan.int8_padding,
            self.dilation,
            self.groups,
        )
        return conv_kernels.match_memory_format(output, x)

    @names_layer_in_input_errors
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, plan = self._choose(x)
        if kernel == "dense":
            return self._forward_dense(plan, x)  # type: ignore[arg-type]
        if kernel == "workspace":
            return self._forward_workspace(plan, x)  # type: ignore[arg-type]
        if kernel == "int8":
            return self._forward_int8(plan, x)  # type: ignore[arg-type]
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the output by dequantizing the whole weight."""
        x = self.quantize_input(x, per_tensor=True)
        return self._convolve(x, self.dequantized_weight(x.dtype))


class _FastPlan(BufferPlan):
    """Per-layer state that the fast paths of a convolution reuse; see :class:`BufferPlan`."""

    def __init__(self, layer: _QuantConvNd, sources: tuple[torch.Tensor | None, ...]) -> None:
        super().__init__(sources)
        spec = layer.weight_spec
        codes, scale, zero_point = sources[:3]
        shape = tuple(codes.shape) if container_bits(spec.bits) == 8 else ()
        self.workspace = dequantize_into_supported(spec, shape)
        self.factors = dequantize_factors(scale, zero_point, spec, shape) if self.workspace else ()
        self.dims = len(layer.weight_shape)
        self.dense = math.prod(layer.weight_shape) <= DENSE_MAX_WEIGHT
        self._dense_weight: torch.Tensor | None = None
        self.int8 = (
            self.workspace
            and layer.activations is not None
            and spec.symmetric
            and (
                spec.granularity == "per_tensor"
                or (spec.granularity == "per_channel" and spec.axis in (0, -self.dims))
            )
            and conv_kernels.int8_conv_available(self.dims - 2)
        )
        # String padding ("same", "valid") and other padding modes are applied to the float
        # input before rounding. Rounding is elementwise, so the order does not change codes.
        self.pad_input = isinstance(layer.padding, str) or layer.padding_mode != "zeros"
        self.int8_padding = (0,) * (self.dims - 2) if self.pad_input else tuple(layer.padding)
        # Static qparams as Python numbers for the int8 call and as tensors for the rounding.
        self.static_qparams: tuple[float, int] | None = None
        self.static_grid: tuple[torch.Tensor, ...] | None = None
        if layer.activations == "static":
            input_scale, input_zero_point = sources[4], sources[5]
            self.static_qparams = (float(input_scale), int(input_zero_point))
            self.static_grid = static_input_grid(input_scale, input_zero_point, INPUT_SPEC)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def dense_weight(self, layer: _QuantConvNd) -> torch.Tensor:
        """Return the float32 dequantized weight, computed on first use and then kept."""
        if self._dense_weight is None:
            self._dense_weight = layer.dequantized_weight(torch.float32).contiguous()
        return self._dense_weight

    def packed_weight(self, layer: _QuantConvNd) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the oneDNN weight and its per-channel scales, packed on first use."""
        if self._packed is None:
            codes, scale = self.sources[:2]
            scale = scale.expand(layer.out_channels).contiguous()
            packed = conv_kernels.prepack_weight(
                codes, scale, layer.stride, self.int8_padding, layer.dilation, layer.groups
            )
            self._packed = (packed, scale)
        return self._packed


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
