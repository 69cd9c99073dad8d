"""Storage shared by every quantized layer: integer weight codes, qparams and input qparams.

A quantized layer takes floats and returns floats, so it drops into any model. Each quantized
weight lives in buffers named after it: ``{name}_codes`` (int8/uint8, or uint8 with several codes
per byte for 4 bits and below), ``{name}_scale`` and, for affine specs, ``{name}_zero_point``. A
layer with one weight (``Linear``, ``Conv``) names it ``weight``, giving ``weight_codes``,
``weight_scale`` and ``weight_zero_point``. A layer with several weights (an LSTM's per-layer and
per-direction matrices) uses the float module's parameter names. Static activation layers add
``input_scale`` and ``input_zero_point``. The layout (bits, shapes, granularity, format version)
travels as extra state in ``state_dict``, which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from mono_quant.core.packing import pack_bits, unpack_bits
from mono_quant.core.qparams import NonFiniteError, choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize, storage_dtype
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import (
    ACTIVATION_GRANULARITIES,
    ACTIVATION_MODES,
    STATIC_SPEC,
    ActivationGranularity,
    ActivationMode,
    dynamic_quantize,
    dynamic_spec,
    quantize_dequantize,
)

FORMAT_VERSION = 1

QParams = tuple[torch.Tensor, torch.Tensor]
# Attribute where the transforms record a layer's qualified name in its model, for messages.
NAME_ATTRIBUTE = "_mono_quant_name"
# Set on layers that another layer runs internally; their errors are named by that layer.
INNER_ATTRIBUTE = "_mono_quant_inner"
_Forward = TypeVar("_Forward", bound=Callable[..., Any])
# Instance attribute of the plan (a BufferPlan) that convolution and recurrent layers keep.
_PLAN_ATTRIBUTE = "_fast_plan"
_PlanBuilder = Callable[[Any, tuple[torch.Tensor | None, ...]], Any]


def names_layer_in_input_errors(forward: _Forward) -> _Forward:
    """Wrap a ``forward`` so that a NaN or infinite input range names the layer in the error.

    The quantization functions see only the tensor (``min_val contains 1 NaN ...``). The
    wrapper re-raises :class:`~mono_quant.core.qparams.NonFiniteError` with the layer's name
    and type in front, once, from the innermost quantized layer.
    """

    @functools.wraps(forward)
    def wrapper(self: QuantizedLayer, *args: Any, **kwargs: Any) -> Any:
        try:
            return forward(self, *args, **kwargs)
        except NonFiniteError as error:
            if getattr(error, "names_layer", False) or self.__dict__.get(INNER_ATTRIBUTE):
                raise
            name = self.__dict__.get(NAME_ATTRIBUTE) or "<layer name>"
            named = NonFiniteError(
                f"the input of {self.describe()} has no finite range to quantize: {error} If "
                f"its inputs can be NaN or infinite, keep the layer in float with "
                f"QuantConfig(overrides={{{name!r}: None}})."
            )
            named.names_layer = True  # type: ignore[attr-defined]
            raise named from error

    return wrapper  # type: ignore[return-value]


def container_bits(bits: int) -> int:
    """Return the packed width that stores ``bits``-bit codes: 2, 4 or 8."""
    if bits <= 2:
        return 2
    return 4 if bits <= 4 else 8


class QuantizedLayer(nn.Module):
    """Base class that stores quantized weights and quantizes inputs per its activation mode.

    Subclasses implement ``forward`` with :meth:`dequantized_weight` as the reference path.
    ``weight_qparams`` come from a weight observer; without them each weight's min/max is used.

    ``weight`` is one tensor, stored under the name ``weight``, or a mapping from names to
    tensors for layers with several weights. In that case ``weight_qparams`` maps the same names
    to qparams. Every weight of a layer shares ``weight_spec``.

    ``activation_granularity`` applies to dynamic activations: ``"per_token"`` (8-bit, one
    scale per row of the last dimension) or ``"per_tensor"`` (7-bit, one scale per call). It is
    saved in the extra state, and a state saved without it loads as ``"per_token"``. Layers that
    call ``quantize_input(x, per_tensor=True)`` (convolutions) use one 8-bit pair per call
    whatever its value.

    Class attributes tell ``convert`` what a subclass supports:

    * ``supports_static``: the first positional input is a float tensor whose range can be
      calibrated, so ``prepare`` may wrap the layer in an ``ObservedLayer``.
    * ``supports_dynamic``: the layer can quantize its inputs at run time.
    * ``static_fallback``: the activation mode used under a static config when
      ``supports_static`` is False (``"dynamic"`` or ``None`` for weight-only).
    * ``weight_only_reason``: why a layer without activation support stays weight-only under
      a static or dynamic config, for the report.
    """

    supports_static: ClassVar[bool] = True
    supports_dynamic: ClassVar[bool] = True
    static_fallback: ClassVar[ActivationMode | None] = None
    weight_only_reason: ClassVar[str] = "its inputs are not quantized"
    activation_granularity: ActivationGranularity | None = None

    @classmethod
    def check_activations(cls, activations: ActivationMode | None) -> None:
        """Raise ``ValueError`` when this layer type cannot quantize its inputs that way."""
        if activations is not None and activations not in ACTIVATION_MODES:
            raise ValueError(
                f"activations={activations!r} is not one of {ACTIVATION_MODES} or None."
            )
        if activations == "static" and not cls.supports_static and cls.supports_dynamic:
            raise ValueError(
                f"{cls.__name__} does not support static activations; use "
                "activations='dynamic' or None."
            )
        supported = cls.supports_static if activations == "static" else cls.supports_dynamic
        if activations is not None and not supported:
            raise ValueError(
                f"{cls.__name__} does not support {activations} activations because "
                f"{cls.weight_only_reason}; pass activations=None (weight-only)."
            )

    def __init__(
        self,
        weight: torch.Tensor | Mapping[str, torch.Tensor],
        weight_spec: QuantSpec,
        bias: torch.Tensor | None,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | Mapping[str, QParams | None] | None = None,
        activation_granularity: ActivationGranularity = "per_token",
    ) -> None:
        super().__init__()
        self.check_activations(activations)
        if activation_granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"activation_granularity={activation_granularity!r} is not one of "
                f"{ACTIVATION_GRANULARITIES}."
            )
        if activations == "static" and input_qparams is None:
            raise ValueError("static activations need input qparams from calibration.")

        weights = dict(weight) if isinstance(weight, Mapping) else {"weight": weight}
        if not weights:
            raise ValueError(f"{type(self).__name__} needs at least one weight to quantize.")
        if weight_qparams is None or isinstance(weight_qparams, Mapping):
            qparams_by_name = dict(weight_qparams or {})
        else:
            qparams_by_name = {"weight": weight_qparams}
        unknown = sorted(set(qparams_by_name) - set(weights))
        if unknown:
            raise ValueError(
                f"weight_qparams names {unknown} that are not weights of {type(self).__name__} "
                f"(weights: {sorted(weights)})."
            )

        self.weight_spec = weight_spec
        self.activations = activations
        # Only dynamic inputs have a granularity, so the other modes store None.
        self.activation_granularity = activation_granularity if activations == "dynamic" else None
        self.weight_names = tuple(weights)
        self.weight_shapes = {name: tuple(w.shape) for name, w in weights.items()}
        # The single-weight layers (Linear, Conv) expose their shape directly.
        self.weight_shape = self.weight_shapes.get("weight")
        for name, tensor in weights.items():
            self._store(name, tensor.detach(), qparams_by_name.get(name))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

        if input_qparams is not None and activations == "static":
            scale, zero_point = input_qparams
            self.register_buffer("input_scale", scale.detach().float().clone())
            self.register_buffer("input_zero_point", zero_point.detach().to(torch.int32).clone())

    def _store(self, name: str, weight: torch.Tensor, qparams: QParams | None) -> None:
        spec = self.weight_spec
        if qparams is None:
            qparams = choose_qparams(*min_max(weight, spec), spec)
        scale, zero_point = qparams[0].float(), qparams[1].to(torch.int32)
        codes = quantize(weight, scale, zero_point, spec)
        self.register_buffer(f"{name}_codes", self._pack(codes))
        self.register_buffer(f"{name}_scale", scale)
        self.register_buffer(f"{name}_zero_point", None if spec.symmetric else zero_point)

    def _store_weight(self, weight: torch.Tensor, qparams: QParams | None) -> None:
        self._store("weight", weight, qparams)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        width = container_bits(self.weight_spec.bits)
        if width == 8:
            return codes
        # Packing works on unsigned codes, so signed grids are offset by -quant_min first.
        unsigned = codes.to(torch.int16) - self.weight_spec.quant_min
        return pack_bits(unsigned, width)

    def _unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        unsigned = unpack_bits(packed, container_bits(self.weight_spec.bits), shape)
        signed = unsigned.to(torch.int16) + self.weight_spec.quant_min
        return signed.to(storage_dtype(self.weight_spec))

    def buffer_sources(self) -> tuple[torch.Tensor | None, ...]:
        """Return the buffers that a single-weight layer's fast paths are derived from.

        They are ``weight_codes``, ``weight_scale``, ``weight_zero_point``, ``bias``,
        ``input_scale`` and ``input_zero_point``, with None where a buffer is absent or None.
        """
        # Read from _buffers directly: Module.__getattr__ costs about a microsecond per call.
        buffers = self._buffers
        return (
            buffers["weight_codes"],
            buffers["weight_scale"],
            buffers["weight_zero_point"],
            buffers["bias"],
            buffers.get("input_scale"),
            buffers.get("input_zero_point"),
        )

    def _buffer_plan(self, sources: tuple[torch.Tensor | None, ...], build: _PlanBuilder) -> Any:
        """Return the kept fast-path plan, rebuilt with ``build(self, sources)`` when stale."""
        plan = self.__dict__.get(_PLAN_ATTRIBUTE)
        if plan is None or not plan.is_current(sources):
            plan = self.__dict__[_PLAN_ATTRIBUTE] = build(self, sources)
        return plan

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() and friends replace the buffers, and a kept plan would hold the old ones.
        self.__dict__.pop(_PLAN_ATTRIBUTE, None)
        return super()._apply(fn, recurse)

    def describe(self) -> str:
        """Return the layer's type with its name in the model, or its weight shapes."""
        name = self.__dict__.get(NAME_ATTRIBUTE)
        if name:
            return f"{type(self).__name__} {name!r}"
        shapes = ", ".join(f"{key} {tuple(shape)}" for key, shape in self.weight_shapes.items())
        return f"{type(self).__name__} ({shapes})"

    def weight_int(self, name: str = "weight") -> torch.Tensor:
        """Return the unpacked integer codes (int8 or uint8) of weight ``name`` in its shape."""
        codes = getattr(self, f"{name}_codes")
        if container_bits(self.weight_spec.bits) == 8:
            return codes
        return self._unpack(codes, self.weight_shapes[name])

    def _zero_point(self, name: str = "weight") -> torch.Tensor:
        zero_point = getattr(self, f"{name}_zero_point")
        if zero_point is not None:
            return zero_point
        return torch.zeros_like(getattr(self, f"{name}_scale"), dtype=torch.int32)

    def dequantized_weight(
        self, dtype: torch.dtype = torch.float32, name: str = "weight"
    ) -> torch.Tensor:
        """Return the float weight that the stored codes represent (the reference path)."""
        return dequantize(
            self.weight_int(name),
            getattr(self, f"{name}_scale"),
            self._zero_point(name),
            self.weight_spec,
            dtype,
        )

    def dequantized_rows(
        self, index: torch.Tensor, dtype: torch.dtype = torch.float32, name: str = "weight"
    ) -> torch.Tensor:
        """Return rows ``index`` of the dequantized weight ``name``, unpacking only those rows.

        A row is one index along dim 0 (an embedding vector). The result equals
        ``dequantized_weight(dtype, name)[index]`` exactly, because the same float operations
        run on the same codes.
        """
        spec = self.weight_spec
        shape = self.weight_shapes[name]
        if spec.granularity == "per_channel" and spec.axis not in (0, -len(shape)):
            return self.dequantized_weight(dtype, name)[index]
        row_length = 1
        for size in shape[1:]:
            row_length *= size
        width = container_bits(spec.bits)
        codes = getattr(self, f"{name}_codes")
        if width == 8:
            rows = codes.reshape(shape[0], row_length)[index]
        elif row_length * width % 8 == 0:
            packed_rows = codes.reshape(shape[0], row_length * width // 8)[index]
            rows = self._unpack(packed_rows.reshape(-1), (index.numel(), row_length))
        else:
            # Rows do not start on a byte boundary, so the whole tensor is unpacked.
            rows = self.weight_int(name).reshape(shape[0], row_length)[index]
        rows = rows.reshape(-1, row_length)

        scale = getattr(self, f"{name}_scale")
        zero_point = self._zero_point(name)
        if spec.granularity != "per_tensor":
            scale = scale[index.reshape(-1)]
            zero_point = zero_point[index.reshape(-1)]
        values = dequantize(rows, scale, zero_point, spec, dtype)
        return values.reshape(*index.shape, *shape[1:])

    def quantized_tensors(self) -> Iterator[torch.Tensor]:
        """Yield the codes, scales and zero_points of every quantized weight."""
        for name in self.weight_names:
            for suffix in ("codes", "scale", "zero_point"):
                tensor = getattr(self, f"{name}_{suffix}")
                if tensor is not None:
                    yield tensor

    def check_floating_input(self, x: torch.Tensor) -> None:
        """Raise a TypeError naming this layer when ``x`` is not a floating-point tensor."""
        if not x.is_floating_point():
            # Rounding an integer tensor onto the grid, or casting the weight to its dtype,
            # would silently return zeros.
            raise TypeError(
                f"the input of {self.describe()} is {x.dtype}, but quantized layers take "
                "floating-point inputs; convert it with x.float()."
            )

    def quantize_input(self, x: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
        """Round ``x`` to the activation grid of this layer, or return it unchanged.

        Dynamic inputs follow ``activation_granularity``; ``per_tensor=True`` (convolutions)
        uses one 8-bit pair for the whole tensor instead.

        NOTE: inputs are rounded and returned as floats (simulated int8), so the matmul runs in
        float. Layers with an integer kernel (``QuantLinear``) skip this on their fast path.
        """
        self.check_floating_input(x)
        if self.activations is None:
            return x
        if self.activations == "dynamic":
            if per_tensor:
                return dynamic_quantize(x, STATIC_SPEC)
            return dynamic_quantize(x, dynamic_spec(self.activation_granularity or "per_token"))
        return quantize_dequantize(x, self.input_scale, self.input_zero_point, STATIC_SPEC)

    def get_extra_state(self) -> dict[str, Any]:
        """Return the storage layout, saved in ``state_dict`` next to the buffers."""
        spec = self.weight_spec
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "bits": spec.bits,
            "container_bits": container_bits(spec.bits),
            "symmetric": spec.symmetric,
            "granularity": spec.granularity,
            "axis": spec.axis,
            "group_size": spec.group_size,
        }
        if self.weight_names == ("weight",):
            state["weight_shape"] = list(self.weight_shapes["weight"])
        else:
            state["weight_shapes"] = {
                name: list(shape) for name, shape in self.weight_shapes.items()
            }
        state["activations"] = self.activations
        if self.activations == "dynamic":
            state["activation_granularity"] = self.activation_granularity
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Check the layout before torch copies any buffer, so a rejected state leaves the layer
        # unchanged (torch calls set_extra_state only after the buffers are copied).
        layout = state_dict.get(prefix + "_extra_state")
        if isinstance(layout, dict):
            try:
                self.set_extra_state(layout)
            except ValueError as error:
                layer = prefix.removesuffix(".") or "(root)"
                raise ValueError(f"layer '{layer}': {error}") from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Check that a loaded layout matches this layer's; raise ``ValueError`` otherwise."""
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"quantized layer state has format_version={version!r}, newer than this "
                f"mono_quant supports ({FORMAT_VERSION}); upgrade mono_quant to load it."
            )
        # The granularity of dynamic inputs is taken from the saved state, not compared with
        # the layer's: it changes no stored tensor. States saved before it existed used
        # per_token.
        granularity = state.get("activation_granularity", "per_token")
        if self.activations == "dynamic" and granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(
                f"quantized layer state has activation_granularity={granularity!r}, which is not "
                f"one of {ACTIVATION_GRANULARITIES}; the file is damaged or from a newer "
                "mono_quant."
            )
        expected = self.get_extra_state()
        mismatched = {
            key: (state.get(key), value)
            for key, value in expected.items()
            if key not in ("format_version", "activation_granularity") and state.get(key) != value
        }
        if mismatched:
            details = ", ".join(
                f"{k}: saved {s!r}, layer {v!r}" for k, (s, v) in mismatched.items()
            )
            raise ValueError(
                f"quantized layer layout does not match the saved state ({details}); quantize "
                "the model with the same config before loading this state_dict."
            )
        if self.activations == "dynamic":
            self.activation_granularity = granularity

    def extra_repr(self) -> str:
        spec = self.weight_spec
        group = f", group_size={spec.group_size}" if spec.group_size else ""
        kind = "symmetric" if spec.symmetric else "affine"
        if self.weight_names == ("weight",):
            shapes = f"weight_shape={self.weight_shape}"
        else:
            shapes = f"weights={len(self.weight_names)}"
        activations = f"activations={self.activations}"
        if self.activation_granularity is not None:
            activations += f" ({self.activation_granularity})"
        return f"{shapes}, bits={spec.bits}, {kind}, {spec.granularity}{group}, {activations}"

    @classmethod
    def layer_spec(cls, spec: QuantSpec) -> QuantSpec:
        """Return the weight spec this class stores ``spec`` as; most layers keep it unchanged.

        ``QuantConfig.weight_spec()`` puts per-channel scales on axis 0 (output channels of
        ``Linear`` and ``Conv``); a layer whose output channels sit elsewhere moves the axis.
        """
        return spec

    @classmethod
    def float_weights(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        """Return the float tensors of ``module`` that this class quantizes, keyed by name.

        Each tensor is in the layout the codes are stored in, so a weight observer records
        exactly the values that are quantized. Single-weight layers return
        ``{"weight": module.weight}``.
        """
        return {"weight": module.weight}
