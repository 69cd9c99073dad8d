"""Quantized ``nn.Embedding`` and ``nn.EmbeddingBag``: integer tables, float rows out.

Each row of the table (one embedding vector) is quantized per_channel along axis 0 (one scale
per row) or per_group along the row, so a lookup unpacks and dequantizes only the rows it reads.
The inputs are integer indices, which are never quantized: these layers are weight-only under
every activation mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.quantized import QParams, QuantizedLayer


def _check_row_spec(layer: str, spec: QuantSpec) -> None:
    if spec.granularity == "per_channel" and spec.axis not in (0, -2):
        raise ValueError(
            f"{layer} quantizes one scale per row (per_channel axis 0), got axis={spec.axis}; "
            "use axis=0, per_group or per_tensor."
        )


def _unique_rows(
    layer: QuantizedLayer, indices: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the indices ``indices`` reads, their dequantized rows, and ``indices`` remapped.

    Raises IndexError for an index outside the table, as ``F.embedding`` does on the float
    table: indexing the unpacked rows would otherwise read row ``-1`` as the last row.
    """
    unique, inverse = torch.unique(indices, return_inverse=True)
    table_rows = layer.weight_shapes["weight"][0]
    if unique.numel() == 0:
        shape = (0, *layer.weight_shapes["weight"][1:])
        return unique, torch.empty(shape, dtype=dtype, device=indices.device), inverse
    low, high = int(unique[0]), int(unique[-1])
    if low < 0 or high >= table_rows:
        bad = low if low < 0 else high
        raise IndexError(
            f"the input of {layer.describe()} contains index {bad}, outside the table's "
            f"{table_rows} rows; indices must lie in [0, {table_rows})."
        )
    return unique, layer.dequantized_rows(unique, dtype), inverse


class _QuantEmbeddingBase(QuantizedLayer):
    """Table storage and construction shared by the quantized embedding layers."""

    supports_static = False
    supports_dynamic = False
    weight_only_reason = "its inputs are integer indices, which are never quantized"
    _float_type: ClassVar[type[nn.Module]]
    # Float-module attributes copied onto the quantized layer, beyond the shared ones.
    _extra_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        module: nn.Embedding | nn.EmbeddingBag,
        weight_spec: QuantSpec,
        weight_qparams: QParams | None = None,
    ) -> None:
        _check_row_spec(type(self).__name__, weight_spec)
        super().__init__(module.weight, weight_spec, None, None, None, weight_qparams)
        shared = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
        for name in (*shared, "scale_grad_by_freq", "sparse", *self._extra_attributes):
            setattr(self, name, getattr(module, name))

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding | nn.EmbeddingBag,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | None = None,
    ) -> Any:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        Raises:
            ValueError: when ``activations`` is not None, because indices are not quantized.
        """
        if type(module) is not cls._float_type:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._float_type.__name__}, got "
                f"{type(module).__name__}."
            )
        cls.check_activations(activations)
        return cls(module, weight_spec, weight_qparams)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float table, for code that reads ``.weight`` directly.

        NOTE: each read dequantizes the whole table; a lookup through ``forward`` reads only the
        rows it needs.
        """
        return self.dequantized_weight()


class QuantEmbedding(_QuantEmbeddingBase):
    """``nn.Embedding`` with an integer table; integer indices in, float vectors out.

    ``padding_idx`` keeps its float meaning (it only affects gradients). A padding row that is
    zero in float stays exactly zero, because every quantization range contains 0 exactly.
    ``max_norm`` renormalizes the looked-up float rows; the stored codes never change.
    """

    _float_type = nn.Embedding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A traced graph cannot check index values in Python; F.embedding on the whole
            # table checks them when the program runs.
            return self.forward_reference(input)
        _, rows, inverse = _unique_rows(self, input, torch.float32)
        # F.embedding applies max_norm to the rows it receives, here a temporary copy.
        return F.embedding(inverse, rows, None, self.max_norm, self.norm_type)

    def forward_reference(self, input: torch.Tensor) -> torch.Tensor:
        """Compute the output from the whole dequantized table; ``forward`` must match it."""
        return F.embedding(
            input, self.dequantized_weight(), self.padding_idx, self.max_norm, self.norm_type
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {super().extra_repr()}"


class QuantEmbeddingBag(_QuantEmbeddingBase):
    """``nn.EmbeddingBag`` with an integer table; sums, means or maxima of float rows out.

    ``offsets``, ``per_sample_weights``, ``padding_idx`` and ``include_last_offset`` behave as
    in the float layer. ``per_sample_weights`` are floats but are not quantized.
    """

    _float_type = nn.EmbeddingBag
    _extra_attributes = ("mode", "include_last_offset")

    def _bag(
        self,
        input: torch.Tensor,
        table: torch.Tensor,
        offsets: torch.Tensor | None,
        per_sample_weights: torch.Tensor | None,
        padding_idx: int | None,
    ) -> torch.Tensor:
        return F.embedding_bag(
            input,
            table,
            offsets,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.mode,
            self.sparse,
            per_sample_weights,
            self.include_last_offset,
            padding_idx,
        )

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # As in QuantEmbedding: the traced graph checks the range in F.embedding_bag.
            return self.forward_reference(input, offsets, per_sample_weights)
        dtype = torch.float32 if per_sample_weights is None else per_sample_weights.dtype
        unique, rows, inverse = _unique_rows(self, input, dtype)
        padding_idx = None
        if self.padding_idx is not None:
            # padding_idx removes entries from their bag, so it is remapped onto the gathered
            # rows; when no entry uses it there is nothing to remove.
            matches = torch.nonzero(unique == self.padding_idx)
            padding_idx = int(matches[0, 0]) if matches.numel() else None
        return self._bag(inverse, rows, offsets, per_sample_weights, padding_idx)

    def forward_reference(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the output from the whole dequantized table; ``forward`` must match it."""
        dtype = torch.float32 if per_sample_weights is None else per_sample_weights.dtype
        table = self.dequantized_weight(dtype)
        return self._bag(input, table, offsets, per_sample_weights, self.padding_idx)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
            f"{super().extra_repr()}"
        )
