"""Quantized ``nn.Linear`` that picks the fastest correct kernel on every call.

Paths, named by :meth:`QuantLinear.kernel_for`:

* ``"fbgemm"``: int8 x int8 on x86 CPUs, weights per_tensor or per_channel. It serves dynamic
  per_tensor inputs on every such CPU, and static and dynamic per_token inputs where the CPU
  has VNNI.
* ``"int8pack"``: weight-only int8, symmetric per_tensor/per_channel, up to
  :data:`~mono_quant.core.kernels.int8pack.INT8PACK_MAX_ROWS_FLOAT32` rows of float32 input
  (``INT8PACK_MAX_ROWS`` of bfloat16/float16), run in bfloat16.
* ``"int4pack"``: weights of 4 bits or fewer, up to
  :data:`~mono_quant.core.kernels.int4pack.INT4PACK_MAX_ROWS` rows, run in bfloat16.
* ``"dense"``: float32 inputs to a small layer on a small call (see
  :mod:`mono_quant.core.kernels.dense`): ``F.linear`` on a kept float32 copy of the
  dequantized weight and the rounded input. It equals the reference bit for bit.
* ``"bf16-workspace"``: weight-only layers with float32 inputs of more rows than the bfloat16
  kernels take, on CPUs with native bfloat16 dot products (AVX512_BF16, AMX): the weight's
  codes (symmetric per_tensor/per_channel, whose scale then multiplies the output) or the
  dequantized weight go into a reused bfloat16 buffer and ``F.linear`` runs in bfloat16. For a
  4096x4096 layer at 512 rows (2 threads, AMD EPYC, torch 2.13) that took 47-49 ms against
  94 ms for float32 ``F.linear``, and moved the output by 0.3% of its norm.
* ``"workspace"``: any CPU layout, dequantized into a reused buffer. It matches the reference
  up to float32 rounding, because symmetric per_tensor/per_channel scales are applied to the
  output, and bit for bit for bfloat16/float16 inputs.
* ``"reference"``: :meth:`QuantLinear.forward_reference`, the definition of the output.

NOTE: the bfloat16 paths round float32 inputs, and the weight scales, to bfloat16 (8
significant bits), so their outputs differ from the reference by a few bfloat16 epsilons of the
output scale. :func:`mono_quant.reference_kernels` or ``MONO_QUANT_KERNELS=reference`` force the
reference path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.fastpath import (
    ROW_QPARAMS_MAX_ABS,
    checked_per_row_qparams,
    round_rows_to_grid,
    round_to_grid,
    static_input_grid,
)
from mono_quant.core.kernels.cache import KernelCache
from mono_quant.core.kernels.cpu import has_native_bfloat16
from mono_quant.core.kernels.dense import DENSE_MAX_MACS, dense_applies, weight_only_max_macs
from mono_quant.core.kernels.fbgemm import (
    fbgemm_engine,
    fbgemm_exact,
    fbgemm_linear,
    pack_int8_weight,
)
from mono_quant.core.kernels.int4pack import (
    INT4PACK_MAX_ROWS,
    INT4PACK_MAX_ROWS_NATIVE_BF16,
    Int4PackedWeight,
    int4pack_group_size,
    int4pack_linear,
    pack_int4_weight,
)
from mono_quant.core.kernels.int8pack import (
    INT8PACK_MAX_ROWS,
    INT8PACK_MAX_ROWS_FLOAT32,
    INT8PACK_MAX_ROWS_NATIVE_BF16,
    has_int8pack_mm,
    int8pack_mm,
)
from mono_quant.core.kernels.mode import fast_kernels_enabled
from mono_quant.core.kernels.workspace import (
    scale_rows_into,
    tile_rows,
    unpack_codes_into,
    workspace,
)
from mono_quant.core.qparams import MIN_SCALE, choose_qparams, min_max
from mono_quant.core.quantize import quantize
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import (
    DYNAMIC_PER_TENSOR_SPEC,
    DYNAMIC_SPEC,
    STATIC_SPEC,
    ActivationGranularity,
    ActivationMode,
    per_tensor_qparams,
)
from mono_quant.nn.quantized import QuantizedLayer, container_bits, names_layer_in_input_errors

REFERENCE = "reference"
FBGEMM = "fbgemm"
INT8PACK = "int8pack"
INT4PACK = "int4pack"
WORKSPACE = "workspace"
DENSE = "dense"
BF16_WORKSPACE = "bf16-workspace"
KERNELS = (REFERENCE, FBGEMM, INT8PACK, INT4PACK, WORKSPACE, DENSE, BF16_WORKSPACE)

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest input code of each activation mode on the fbgemm path (see nn.activation).
_STATIC_QUANT_MAX = 255
_DYNAMIC_QUANT_MAX = DYNAMIC_PER_TENSOR_SPEC.quant_max
_PER_TOKEN_QUANT_MAX = DYNAMIC_SPEC.quant_max
# Per-token codes go to fbgemm as the exact floats ``code - 128`` with scale 1 and zero_point
# 128, so the kernel multiplies each token's own codes. The per-token scale and zero_point
# are applied to its output (see ``_forward_per_token``).
_CENTER = 128


# The active quantized engine as a number, in one C call; torch.backends.quantized.engine maps
# the same number to a name in Python.
_GET_QENGINE = getattr(torch._C, "_get_qengine", None)


class QuantLinear(QuantizedLayer):
    """``nn.Linear`` with an integer weight; floats in, floats out.

    ``forward`` runs the path :meth:`kernel_for` names; :meth:`forward_reference` dequantizes
    the whole weight and defines the expected output. Prepacked kernel weights are built on
    first use and kept in a plain attribute (not in ``state_dict``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        activation_granularity: ActivationGranularity = "per_token",
    ) -> None:
        super().__init__(
            weight,
            weight_spec,
            bias,
            activations,
            input_qparams,
            weight_qparams,
            activation_granularity=activation_granularity,
        )
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self._kernels = KernelCache()

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        activation_granularity: ActivationGranularity = "per_token",
    ) -> QuantLinear:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        ``activation_granularity`` applies to dynamic activations (see ``QuantizedLayer``).
        """
        return cls(
            module.weight,
            module.bias,
            weight_spec,
            activations,
            input_qparams,
            weight_qparams,
            activation_granularity=activation_granularity,
        )

    # -----------------------------------------------------------------------------------------
    # Cache of prepacked weights

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # .to(), .cuda() and friends replace the buffers, so packed weights built from the old
        # ones are dropped at once instead of on the next call.
        self._kernels.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        self._kernels.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _weight_sources(self) -> tuple[torch.Tensor | None, ...]:
        # Read from _buffers directly: Module.__getattr__ costs about a microsecond per call.
        buffers = self._buffers
        return (buffers["weight_codes"], buffers["weight_scale"], buffers["weight_zero_point"])

    def _fbgemm_weight(self, engine: str) -> Any | None:
        return self._kernels.get(f"fbgemm:{engine}", self.buffer_sources(), self._pack_fbgemm)

    def _pack_fbgemm(self) -> Any | None:
        spec = self.weight_spec
        per_channel_rows = spec.granularity == "per_channel" and spec.axis in (0, -2)
        if spec.granularity != "per_tensor" and not per_channel_rows:
            return None
        codes = self.weight_int()
        # The per-token path scales the kernel's output per token, so the bias is added after.
        bias = None if self._per_token() else self.bias
        packed = pack_int8_weight(codes, self.weight_scale, self.weight_zero_point, bias)
        if packed is None:
            return None
        # Static qparams as Python numbers, read once: float(tensor) costs about 1 us per call.
        static = None
        if self.activations == "static":
            static = (float(self.input_scale), int(self.input_zero_point))
        return packed, static

    def _per_token(self) -> bool:
        return self.activations == "dynamic" and self.activation_granularity == "per_token"

    def _weight_row_sums(self) -> torch.Tensor:
        """Return the sum of each dequantized weight row, which the per-token path needs."""

        def build() -> torch.Tensor:
            return self.dequantized_weight(torch.float32).sum(dim=1)

        return self._kernels.get("row_sums", self._weight_sources(), build)

    def _dense_weight(self) -> torch.Tensor:
        def build() -> torch.Tensor:
            return self.dequantized_weight(torch.float32).contiguous()

        return self._kernels.get("dense", self._weight_sources(), build)

    def _static_grid(self) -> tuple[torch.Tensor, ...]:
        def build() -> tuple[torch.Tensor, ...]:
            return static_input_grid(self.input_scale, self.input_zero_point, STATIC_SPEC)

        sources = (self._buffers["input_scale"], self._buffers["input_zero_point"])
        return self._kernels.get("static_grid", sources, build)

    def _int8pack_scale(self, dtype: torch.dtype) -> torch.Tensor:
        def build() -> torch.Tensor:
            return self.weight_scale.expand(self.out_features).to(dtype).contiguous()

        return self._kernels.get(f"int8pack_scale:{dtype}", (self.weight_scale,), build)

    def _int4pack_weight(self) -> Int4PackedWeight | None:
        return self._kernels.get("int4pack", self._weight_sources(), self._pack_int4)

    def _pack_int4(self) -> Int4PackedWeight | None:
        spec = self.weight_spec
        if container_bits(spec.bits) > 4 or len(self.weight_shape) != 2:
            return None
        if spec.granularity == "per_group":
            block = spec.group_size
        elif spec.granularity == "per_tensor" or spec.axis in (0, -2):
            block = self.in_features
        else:
            return None
        group_size = int4pack_group_size(self.out_features, self.in_features, block)
        if group_size is None:
            return None
        groups = self.in_features // group_size

        def per_group(values: torch.Tensor) -> torch.Tensor:
            if spec.granularity == "per_group":
                return values.repeat_interleave(block // group_size, dim=1)
            return values.reshape(-1, 1).expand(self.out_features, groups)

        scale = per_group(self.weight_scale)
        zero_point = None if spec.symmetric else per_group(self._zero_point())
        return pack_int4_weight(self.weight_int(), scale, zero_point, group_size)

    # -----------------------------------------------------------------------------------------
    # Dispatch

    def _scales_by_row(self) -> bool:
        """Return True when each scale covers (part of) one output row, as the kernels expect."""
        spec = self.weight_spec
        return spec.granularity != "per_channel" or spec.axis in (0, -2)

    def packed_int8_weight(self) -> Any | None:
        """Return the fbgemm-packed weight (bias included) of a static int8 layer, or None.

        None where the layer's inputs are not static, or where the active engine has no exact
        int8 kernel. :class:`mono_quant.nn.QuantSequential` passes 8-bit codes to it.
        """
        if self.activations != "static":
            return None
        plan = self._fbgemm_plan()
        return None if plan is None else plan[0]

    def _fbgemm_plan(self) -> Any | None:
        """Return the packed fbgemm weight when this layer's inputs go through fbgemm."""
        if self.activations == "static":
            quant_max = _STATIC_QUANT_MAX
        elif self.activations == "dynamic" and self.activation_granularity == "per_tensor":
            quant_max = _DYNAMIC_QUANT_MAX
        elif self._per_token():
            quant_max = _PER_TOKEN_QUANT_MAX
        else:
            return None
        engine = fbgemm_engine()
        if engine is None or not fbgemm_exact(quant_max, engine):
            return None
        return self._fbgemm_weight(engine)

    def _uses_int8pack(self, rows: int, dtype: torch.dtype, bf16_workspace: bool) -> bool:
        spec = self.weight_spec
        if dtype != torch.float32:
            max_rows = INT8PACK_MAX_ROWS
        elif bf16_workspace:
            max_rows = INT8PACK_MAX_ROWS_NATIVE_BF16
        else:
            max_rows = INT8PACK_MAX_ROWS_FLOAT32
        return (
            rows <= max_rows
            and container_bits(spec.bits) == 8
            and spec.symmetric
            and spec.granularity in ("per_tensor", "per_channel")
            # The AVX-512 kernel reads 16 features per step with no tail loop.
            and self.in_features % 16 == 0
            and has_int8pack_mm()
        )

    def _plan(self, x: torch.Tensor) -> tuple[str, Any]:
        """Return the path for ``x`` and what it needs (a packed weight), packing on first use.

        The decision is kept for the next call with the same dtype, row count and quantized
        engine, as long as the buffers stay unchanged. Working it out again costs 5 us of Python
        with warm caches, and tens of us after a large matmul has evicted the CPU caches.
        """
        # Checked inline: each Python call costs microseconds when the CPU caches are cold.
        # The kernels have no backward, and the workspace is overwritten by the next layer.
        # Quantized inputs carry no gradient on the reference path either (rounding to integer
        # codes cuts the graph), so only weight-only layers need the reference for autograd.
        buffers = self._buffers
        in_features = self.in_features
        if not (
            x.dtype in _FAST_DTYPES
            and x.is_cpu
            and x.dim() >= 1
            and x.shape[-1] == in_features > 0
            and x.numel() > 0
            and not (self.activations is None and x.requires_grad and torch.is_grad_enabled())
            and fast_kernels_enabled()
            and buffers["weight_codes"].is_cpu
            and self._scales_by_row()
        ):
            return REFERENCE, None
        rows = x.numel() // in_features
        sources = self.buffer_sources()
        get_engine = _GET_QENGINE
        key = (x.dtype, rows, get_engine() if get_engine is not None else fbgemm_engine())
        decision = self._kernels.recall(key, sources)
        if decision is None:
            decision = self._decide(x, rows)
            self._kernels.remember(key, sources, decision)
        return decision

    def _decide(self, x: torch.Tensor, rows: int) -> tuple[str, Any]:
        # Weight-only float32 inputs on a native-bfloat16 CPU have the bfloat16 workspace for
        # many rows, which overtakes the bfloat16 kernels at fewer rows than float32 does.
        bf16_workspace = (
            self.activations is None and x.dtype == torch.float32 and has_native_bfloat16()
        )
        weight_numel = self.in_features * self.out_features
        max_macs = (
            weight_only_max_macs(bf16_workspace) if self.activations is None else DENSE_MAX_MACS
        )
        if x.dtype == torch.float32 and dense_applies(weight_numel, rows * weight_numel, max_macs):
            return DENSE, self._dense_weight()
        packed = self._fbgemm_plan()
        if packed is not None:
            return FBGEMM, packed
        if self._uses_int8pack(rows, x.dtype, bf16_workspace):
            return INT8PACK, None
        # The int4 kernel runs in bfloat16; float16 inputs keep their precision on the workspace.
        int4_rows = INT4PACK_MAX_ROWS_NATIVE_BF16 if bf16_workspace else INT4PACK_MAX_ROWS
        if rows <= int4_rows and x.dtype != torch.float16:
            packed = self._int4pack_weight()
            if packed is not None:
                return INT4PACK, packed
        if bf16_workspace:
            return BF16_WORKSPACE, None
        return WORKSPACE, None

    def kernel_for(self, x: torch.Tensor) -> str:
        """Return the name of the path ``forward(x)`` takes, one of ``KERNELS``.

        Packs the kernel weight on first use, because whether a kernel applies can depend on
        the packing succeeding.

        NOTE: a weight-only layer whose input requires grad, with grad mode on, takes the
        reference path so that the gradient reaches the input. Run inference under
        ``torch.no_grad()`` or ``torch.inference_mode()`` to get the fast paths.
        """
        return self._plan(x)[0]

    # -----------------------------------------------------------------------------------------
    # Paths

    @names_layer_in_input_errors
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, packed = self._plan(x)
        if kernel == FBGEMM:
            return self._forward_fbgemm(x, packed)
        if kernel == REFERENCE:
            return self.forward_reference(x)
        x = self._round_input(x)
        if kernel == DENSE:
            bias = self._buffers["bias"]
            return F.linear(x, packed, bias)
        if kernel == INT8PACK:
            return self._forward_int8pack(x)
        if kernel == INT4PACK:
            return self._forward_int4pack(x, packed)
        if kernel == BF16_WORKSPACE:
            return self._forward_bf16_workspace(x)
        return self._forward_workspace(x)

    def forward_reference(self, x: torch.Tensor, quantize_input: bool = True) -> torch.Tensor:
        """Compute the output by dequantizing the whole weight; every fast path must match it."""
        if quantize_input:
            x = self.quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _round_input(self, x: torch.Tensor) -> torch.Tensor:
        """Return :meth:`quantize_input` of ``x``, with fewer tensor operations where exact.

        float32 inputs take :func:`round_to_grid` (static, dynamic per_tensor and a single
        dynamic token) or :func:`round_rows_to_grid` (dynamic per_token), which equal the
        reference bit for bit. Other inputs, and rows that contain NaN or infinity, take
        :meth:`quantize_input` itself.
        """
        if self.activations is None or x.dtype != torch.float32:
            return self.quantize_input(x)
        x = x.detach()
        if self.activations == "static":
            scale, _, low, high = self._static_grid()
            return round_to_grid(x, scale, low, high)
        rows = x.reshape(-1, self.in_features)
        spec = None
        if self.activation_granularity == "per_tensor":
            spec = DYNAMIC_PER_TENSOR_SPEC
        elif rows.shape[0] == 1:
            # One token's pair is a per_tensor pair, computed with one reduction.
            spec = DYNAMIC_SPEC
        if spec is not None:
            scale, zero_point = per_tensor_qparams(x, spec)
            low, high = spec.quant_min - zero_point, spec.quant_max - zero_point
            return round_to_grid(x, scale, float(low), float(high))
        qparams = checked_per_row_qparams(rows, DYNAMIC_SPEC)
        if qparams is None:
            return self.quantize_input(x)
        return round_rows_to_grid(rows, *qparams, DYNAMIC_SPEC).view(x.shape)

    def _add_bias(self, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        output = output.to(dtype)
        return output if self.bias is None else output + self.bias.to(dtype)

    def _forward_fbgemm(self, x: torch.Tensor, plan: tuple[Any, Any]) -> torch.Tensor:
        packed, static = plan
        if self._per_token():
            return self._forward_per_token(x, packed)
        if static is not None:
            input_scale, input_zero_point = static
        else:
            # The reference's qparams, so the two paths differ only where x / scale is a tie.
            input_scale, input_zero_point = per_tensor_qparams(x, DYNAMIC_PER_TENSOR_SPEC)
        # Detached: like the reference's rounding, the integer kernel passes no gradient.
        x_float = x.detach().float() if x.requires_grad or x.dtype != torch.float32 else x
        output = fbgemm_linear(x_float, input_scale, input_zero_point, packed)
        return output if x.dtype == torch.float32 else output.to(x.dtype)

    def _forward_per_token(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        """Run fbgemm on per-token codes and apply each token's scale and zero_point after.

        With codes ``c``, per-token ``(s, z)`` and dequantized weight ``W``, the reference
        computes ``s * (c - z) @ W.T``. The kernel gets ``x / s - (128 - z)`` with scale 1 and
        zero_point 128, so its own rounding and clamping produce ``c`` and it computes
        ``(c - 128) @ W.T``. Adding ``(128 - z) * W.sum(1)`` and multiplying by ``s`` gives
        the reference value up to float rounding, and up to one code where ``x / s`` is within
        float rounding of a tie.

        A single token's pair is a per_tensor pair, which the kernel takes directly, like a
        static layer's: that skips the centring and the per-token corrections.
        """
        x_float = x.detach().float().reshape(-1, self.in_features)
        if x_float.shape[0] == 1:
            scale, zero_point = per_tensor_qparams(x_float, DYNAMIC_SPEC)
            output = fbgemm_linear(x_float, scale, zero_point, packed)
            output = output.view(*x.shape[:-1], self.out_features)
            return self._add_bias(output, x.dtype)
        # Each token's pair, with the operations of choose_qparams in a shorter order: the
        # scale may differ in its last bit, which moves the output by float rounding only.
        levels = DYNAMIC_SPEC.quant_max - DYNAMIC_SPEC.quant_min
        low = x_float.amin(dim=-1, keepdim=True).clamp_max_(0.0)
        high = x_float.amax(dim=-1, keepdim=True).clamp_min_(0.0)
        scale = high.sub_(low).div_(levels).clamp_min_(MIN_SCALE)
        # NaN fails the comparison too.
        if float(scale.max()) <= ROW_QPARAMS_MAX_ABS / levels:
            # shift is 128 - zero_point. The kernel rounds x / scale - shift, adds 128 and
            # clamps to [0, 255], which gives the token's codes; it returns them less 128.
            shift = torch.div(low, scale).round_().add_(_CENTER)
            centred = torch.div(x_float, scale).sub_(shift)
        else:
            # NaN, infinity or huge values: the reference functions raise or cap as usual.
            scale, zero_point = choose_qparams(*min_max(x_float, DYNAMIC_SPEC), DYNAMIC_SPEC)
            codes = quantize(x_float, scale, zero_point, DYNAMIC_SPEC)
            centred = codes.to(torch.float32).sub_(_CENTER)
            scale = scale.to(torch.float32).unsqueeze(-1)
            shift = _CENTER - zero_point.to(torch.float32).unsqueeze(-1)
        output = fbgemm_linear(centred, 1.0, _CENTER, packed)

        output.addcmul_(shift, self._weight_row_sums())
        output.mul_(scale)
        output = output.view(*x.shape[:-1], self.out_features)
        return self._add_bias(output, x.dtype)

    def _forward_int8pack(self, x: torch.Tensor) -> torch.Tensor:
        # Float32 inputs run in bfloat16, where the kernel is fast.
        dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
        output = int8pack_mm(x.to(dtype), self.weight_codes, self._int8pack_scale(dtype))
        return self._add_bias(output, x.dtype)

    def _forward_int4pack(self, x: torch.Tensor, packed: Int4PackedWeight) -> torch.Tensor:
        output = int4pack_linear(x.to(torch.bfloat16), packed)
        return self._add_bias(output, x.dtype)

    def _scales_factor_out(self) -> bool:
        """Return True when the weight scale factors out of the matmul onto the output.

        Symmetric per_tensor and per_channel scales do: ``x @ (q * s).T == (x @ q.T) * s``.
        """
        spec = self.weight_spec
        return spec.symmetric and spec.granularity in ("per_tensor", "per_channel")

    def _scale_on_output(self, x: torch.Tensor) -> bool:
        """Return True when the weight scale is cheaper to apply to the output than the weight.

        Where the scale factors out, one multiply over (rows, out) replaces one over (out, in).
        Half inputs keep the exact reference weight, which has to be dequantized for the cast
        anyway.
        """
        rows = x.numel() // self.in_features
        return x.dtype == torch.float32 and self._scales_factor_out() and rows < self.in_features

    def _forward_bf16_workspace(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if not self._scales_factor_out():
            weight = self.dequantized_weight_workspace(torch.bfloat16)
            return self._add_bias(F.linear(x, weight), torch.float32)
        # Integer codes of up to 8 bits are exact in bfloat16, so the workspace takes them in
        # one conversion pass and the float32 scale goes onto the output. For a 4096x4096 int8
        # weight (2 threads, Intel Xeon with AMX, torch 2.13) that pass took 1.9 ms, against
        # 8.6 ms for dequantizing in float32 tiles and rounding to bfloat16. The output is also
        # closer to the reference, because the weight is no longer rounded to bfloat16.
        output = F.linear(x, self._weight_workspace(scaled=False, dtype=torch.bfloat16)).float()
        output.mul_(self.weight_scale)
        return output if self.bias is None else output.add_(self.bias)

    def _forward_workspace(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale_on_output(x):
            output = F.linear(x, self._weight_workspace(scaled=False))
            output.mul_(self.weight_scale)
            return output if self.bias is None else output.add_(self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight_workspace(x.dtype), bias)

    def dequantized_weight_workspace(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return :meth:`dequantized_weight` computed into this thread's reused workspace.

        The values equal ``dequantized_weight(dtype)`` bit for bit. The tensor is overwritten by
        the next layer that dequantizes into the workspace, so consume it at once. Scales must
        cover output rows (per_tensor, per_group, or per_channel on axis 0).
        """
        return self._weight_workspace(scaled=True, dtype=dtype)

    def _weight_workspace(self, scaled: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the float codes (``scaled=False``, symmetric only) or dequantized weight.

        The rows are converted one tile at a time, so the unpacking, offset and scaling passes
        over a tile run while it is still in the CPU cache. For another ``dtype`` a scaled
        tile is computed in float32, as the reference does, and then rounded into the result.
        Codes alone are small integers, exact in every float dtype, so they need no staging.
        """
        spec = self.weight_spec
        rows, columns = self.out_features, self.in_features
        codes = self._buffers["weight_codes"]
        step = tile_rows(columns)
        if dtype == torch.float32 or not scaled:
            result = staging = workspace((rows, columns), dtype, codes.device)
        else:
            result = workspace((rows, columns), dtype, codes.device)
            staging = workspace((min(step, rows), columns), torch.float32, codes.device)
        width = container_bits(spec.bits)
        packed_rows = None
        if width == 8:
            codes = codes.reshape(rows, columns)
        elif columns * width % 8 == 0:
            packed_rows = codes.reshape(rows, columns * width // 8)
        else:
            # Rows do not start on a byte boundary, so the generic unpacking runs once.
            codes = self.weight_int()
        scale = self.weight_scale
        zero_point = self.weight_zero_point
        group_size = spec.group_size if spec.granularity == "per_group" else None

        for start in range(0, rows, step):
            stop = min(start + step, rows)
            tile = staging[start:stop] if result is staging else staging[: stop - start]
            if packed_rows is not None:
                unpack_codes_into(tile, packed_rows[start:stop], width, spec.quant_min)
            else:
                tile.copy_(codes[start:stop])
            if scaled and scale.dim() == 0:
                scale_rows_into(tile, scale, zero_point, group_size)
            elif scaled:
                tile_zero_point = None if zero_point is None else zero_point[start:stop]
                scale_rows_into(tile, scale[start:stop], tile_zero_point, group_size)
            if result is not staging:
                result[start:stop].copy_(tile)
        return result
