"""Quantized ``nn.Embedding`` and ``nn.EmbeddingBag``: integer tables, float rows out.

Each row of the table (one embedding vector) is quantized per_channel along axis 0 (one scale
per row) or per_group along the row, so a lookup unpacks and dequantizes only the rows it reads.
The inputs are integer indices, which are never quantized: these layers are weight-only under
every activation mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.quantized import QParams, QuantizedLayer


def _check_weight_only(layer: str, activations: ActivationMode | None) -> None:
    if activations is not None:
        raise ValueError(
            f"{layer} takes integer indices, which have no activation range, so activations="
            f"{activations!r} does not apply; pass activations=None (weight-only)."
        )


def _check_row_spec(layer: str, spec: QuantSpec) -> None:
    if spec.granularity == "per_channel" and spec.axis not in (0, -2):
        raise ValueError(
            f"{layer} quantizes one scale per row (per_channel axis 0), got axis={spec.axis}; "
            "use axis=0, per_group or per_tensor."
        )


def _unique_rows(
    layer: QuantizedLayer, indices: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the dequantized rows that ``indices`` reads and ``indices`` remapped onto them."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    return layer.dequantized_rows(unique, dtype), inverse


class QuantEmbedding(QuantizedLayer):
    """``nn.Embedding`` with an integer table; integer indices in, float vectors out.

    ``padding_idx`` keeps its float meaning (it only affects gradients). A padding row that is
    zero in float stays exactly zero, because every quantization range contains 0 exactly.
    ``max_norm`` renormalizes the looked-up float rows; the stored codes never change.
    """

    supports_static = False
    supports_dynamic = False
    weight_only_reason = "its inputs are integer indices, which are never quantized"

    def __init__(
        self,
        module: nn.Embedding,
        weight_spec: QuantSpec,
        weight_qparams: QParams | None = None,
    ) -> None:
        _check_row_spec(type(self).__name__, weight_spec)
        super().__init__(module.weight, weight_spec, None, None, None, weight_qparams)
        self.num_embeddings = module.num_embeddings
        self.embedding_dim = module.embedding_dim
        self.padding_idx = module.padding_idx
        self.max_norm = module.max_norm
        self.norm_type = module.norm_type
        self.scale_grad_by_freq = module.scale_grad_by_freq
        self.sparse = module.sparse

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | None = None,
    ) -> QuantEmbedding:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        Raises:
            ValueError: when ``activations`` is not None, because indices are not quantized.
        """
        if type(module) is not nn.Embedding:
            raise TypeError(
                f"{cls.__name__}.from_float expects Embedding, got {type(module).__name__}."
            )
        _check_weight_only(cls.__name__, activations)
        return cls(module, weight_spec, weight_qparams)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float table, for code that reads ``embedding.weight`` directly.

        NOTE: each read dequantizes the whole table; a lookup through ``forward`` reads only the
        rows it needs.
        """
        return self.dequantized_weight()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, inverse = _unique_rows(self, input, torch.float32)
        # F.embedding applies max_norm to the rows it receives, here a temporary copy.
        return F.embedding(inverse, rows, None, self.max_norm, self.norm_type)

    def forward_reference(self, input: torch.Tensor) -> torch.Tensor:
        """Compute the output from the whole dequantized table; ``forward`` must match it."""
        return F.embedding(
            input, self.dequantized_weight(), self.padding_idx, self.max_norm, self.norm_type
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {super().extra_repr()}"


class QuantEmbeddingBag(QuantizedLayer):
    """``nn.EmbeddingBag`` with an integer table; sums, means or maxima of float rows out.

    ``offsets``, ``per_sample_weights``, ``padding_idx`` and ``include_last_offset`` behave as
    in the float layer. ``per_sample_weights`` are floats but are not quantized.
    """

    supports_static = False
    supports_dynamic = False
    weight_only_reason = "its inputs are integer indices, which are never quantized"

    def __init__(
        self,
        module: nn.EmbeddingBag,
        weight_spec: QuantSpec,
        weight_qparams: QParams | None = None,
    ) -> None:
        _check_row_spec(type(self).__name__, weight_spec)
        super().__init__(module.weight, weight_spec, None, None, None, weight_qparams)
        self.num_embeddings = module.num_embeddings
        self.embedding_dim = module.embedding_dim
        self.padding_idx = module.padding_idx
        self.max_norm = module.max_norm
        self.norm_type = module.norm_type
        self.scale_grad_by_freq = module.scale_grad_by_freq
        self.mode = module.mode
        self.sparse = module.sparse
        self.include_last_offset = module.include_last_offset

    @classmethod
    def from_float(
        cls,
        module: nn.EmbeddingBag,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: QParams | None = None,
    ) -> QuantEmbeddingBag:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        Raises:
            ValueError: when ``activations`` is not None, because indices are not quantized.
        """
        if type(module) is not nn.EmbeddingBag:
            raise TypeError(
                f"{cls.__name__}.from_float expects EmbeddingBag, got {type(module).__name__}."
            )
        _check_weight_only(cls.__name__, activations)
        return cls(module, weight_spec, weight_qparams)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized float table, for code that reads ``embedding_bag.weight`` directly."""
        return self.dequantized_weight()

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
        dtype = torch.float32 if per_sample_weights is None else per_sample_weights.dtype
        unique, inverse = torch.unique(input, return_inverse=True)
        rows = self.dequantized_rows(unique, dtype)
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
