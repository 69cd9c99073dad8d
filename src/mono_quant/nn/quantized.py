"""Storage shared by every quantized layer: integer weight codes, qparams and input qparams.

A quantized layer takes floats and returns floats, so it drops into any model. Its weight lives
in buffers: ``weight_codes`` (int8/uint8, or uint8 with several codes per byte for 4 bits and
below), ``weight_scale`` and, for affine specs, ``weight_zero_point``. Static activation layers
add ``input_scale`` and ``input_zero_point``. The layout (bits, shape, granularity, format
version) travels as extra state in ``state_dict``, which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant.core.packing import pack_bits, unpack_bits
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, quantize, storage_dtype
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import (
    ACTIVATION_MODES,
    STATIC_SPEC,
    ActivationMode,
    dynamic_per_token,
    quantize_dequantize,
)

FORMAT_VERSION = 1


def container_bits(bits: int) -> int:
    """Return the packed width that stores ``bits``-bit codes: 2, 4 or 8."""
    if bits <= 2:
        return 2
    return 4 if bits <= 4 else 8


class QuantizedLayer(nn.Module):
    """Base class that stores a quantized weight and quantizes inputs per its activation mode.

    Subclasses implement ``forward`` with :meth:`dequantized_weight` as the reference path.
    ``weight_qparams`` come from a weight observer; without them the weight's min/max is used.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_spec: QuantSpec,
        bias: torch.Tensor | None,
        activations: ActivationMode | None = None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        weight_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if activations is not None and activations not in ACTIVATION_MODES:
            raise ValueError(
                f"activations={activations!r} is not one of {ACTIVATION_MODES} or None."
            )
        if activations == "static" and input_qparams is None:
            raise ValueError("static activations need input qparams from calibration.")

        self.weight_spec = weight_spec
        self.activations = activations
        self.weight_shape = tuple(weight.shape)
        self._store_weight(weight.detach(), weight_qparams)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

        if input_qparams is not None and activations == "static":
            scale, zero_point = input_qparams
            self.register_buffer("input_scale", scale.detach().float().clone())
            self.register_buffer("input_zero_point", zero_point.detach().to(torch.int32).clone())

    def _store_weight(
        self, weight: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        spec = self.weight_spec
        if qparams is None:
            qparams = choose_qparams(*min_max(weight, spec), spec)
        scale, zero_point = qparams[0].float(), qparams[1].to(torch.int32)
        codes = quantize(weight, scale, zero_point, spec)
        self.register_buffer("weight_codes", self._pack(codes))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", None if spec.symmetric else zero_point)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        width = container_bits(self.weight_spec.bits)
        if width == 8:
            return codes
        # Packing works on unsigned codes, so signed grids are offset by -quant_min first.
        unsigned = codes.to(torch.int16) - self.weight_spec.quant_min
        return pack_bits(unsigned, width)

    def weight_int(self) -> torch.Tensor:
        """Return the unpacked integer weight codes (int8 or uint8) in the weight's shape."""
        width = container_bits(self.weight_spec.bits)
        if width == 8:
            return self.weight_codes
        unsigned = unpack_bits(self.weight_codes, width, self.weight_shape)
        signed = unsigned.to(torch.int16) + self.weight_spec.quant_min
        return signed.to(storage_dtype(self.weight_spec))

    def _zero_point(self) -> torch.Tensor:
        if self.weight_zero_point is not None:
            return self.weight_zero_point
        return torch.zeros_like(self.weight_scale, dtype=torch.int32)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the float weight that the stored codes represent (the reference path)."""
        return dequantize(
            self.weight_int(), self.weight_scale, self._zero_point(), self.weight_spec, dtype
        )

    def quantize_input(self, x: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
        """Round ``x`` to the activation grid of this layer, or return it unchanged.

        NOTE: inputs are rounded and returned as floats (simulated int8), so the matmul runs in
        float. This reproduces int8 accuracy exactly; it does not make the layer faster.
        """
        if self.activations is None:
            return x
        if self.activations == "dynamic":
            return dynamic_per_token(x, per_tensor=per_tensor)
        return quantize_dequantize(x, self.input_scale, self.input_zero_point, STATIC_SPEC)

    def get_extra_state(self) -> dict[str, Any]:
        """Return the storage layout, saved in ``state_dict`` next to the buffers."""
        spec = self.weight_spec
        return {
            "format_version": FORMAT_VERSION,
            "bits": spec.bits,
            "container_bits": container_bits(spec.bits),
            "symmetric": spec.symmetric,
            "granularity": spec.granularity,
            "axis": spec.axis,
            "group_size": spec.group_size,
            "weight_shape": list(self.weight_shape),
            "activations": self.activations,
        }

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
        expected = self.get_extra_state()
        mismatched = {
            key: (state.get(key), value)
            for key, value in expected.items()
            if key != "format_version" and state.get(key) != value
        }
        if mismatched:
            details = ", ".join(
                f"{k}: saved {s!r}, layer {v!r}" for k, (s, v) in mismatched.items()
            )
            raise ValueError(
                f"quantized layer layout does not match the saved state ({details}); quantize "
                "the model with the same config before loading this state_dict."
            )

    def extra_repr(self) -> str:
        spec = self.weight_spec
        group = f", group_size={spec.group_size}" if spec.group_size else ""
        kind = "symmetric" if spec.symmetric else "affine"
        return (
            f"weight_shape={self.weight_shape}, bits={spec.bits}, {kind}, "
            f"{spec.granularity}{group}, activations={self.activations}"
        )
