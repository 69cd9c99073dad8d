"""Quantized ``nn.MultiheadAttention`` and helpers for the transformer layers that contain it.

``MultiheadAttention`` keeps its packed input projection as a parameter (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value sizes differ) and its
output projection in a ``Linear`` subclass that it reads through ``out_proj.weight``. Both are
quantized here, inside one module, which replaces the whole attention layer.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have fused inference paths that read
``self_attn.in_proj_weight`` and ``linear1.weight`` directly, which quantized layers do not
have; :func:`disable_fused_transformer_paths` switches those layers to their unfused path, which
calls the submodules and computes the same function.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.kernels.mode import fast_kernels_enabled
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.cast import CastLayer
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.quantized import (
    INNER_ATTRIBUTE,
    QParams,
    QuantizedLayer,
    names_layer_in_input_errors,
)

# Paths of QuantMultiheadAttention.forward, named by kernel_for.
PROJECTIONS = "projections"
REFERENCE = "reference"

# Attributes of nn.MultiheadAttention that transformer layers read from their ``self_attn``.
MHA_ATTRIBUTES = (
    "embed_dim",
    "kdim",
    "vdim",
    "_qkv_same_embed_dim",
    "num_heads",
    "dropout",
    "batch_first",
    "head_dim",
    "add_zero_attn",
    "in_proj_bias",
    "bias_k",
    "bias_v",
)


class QuantMultiheadAttention(QuantizedLayer):
    """``nn.MultiheadAttention`` with integer input and output projections.

    Quantized weights: ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight``) and ``out_proj_weight``; per-channel scales are per output row. Biases,
    ``bias_k`` and ``bias_v`` stay float. The call signature and outputs match the float layer.

    Dynamic activations quantize query, key and value per token before the input projection and
    the attention output per token before the output projection. Static activations are not
    supported (the output projection's input is never seen by an ``ObservedLayer``); a static
    config uses dynamic activations.

    ``forward`` takes one of two paths (:meth:`kernel_for` names it):

    * ``"projections"``: float32 self-attention on CPU (``query``, ``key`` and ``value`` the
      same batched tensor) without attention weights, ``bias_k``/``bias_v``,
      ``add_zero_attn`` or active dropout. ``key_padding_mask`` and ``attn_mask`` (bool, or
      float32 added to the scores, in the shapes torch documents) and ``is_causal`` are
      applied as ``F.multi_head_attention_forward`` applies them. The two projections run as
      ``QuantLinear`` layers that share this layer's buffers, so they take the fast kernels of
      :mod:`mono_quant.nn.linear` (int8 x int8 for dynamic inputs), and
      ``F.scaled_dot_product_attention`` runs between them. That is the call
      ``nn.TransformerEncoderLayer`` makes in inference, with or without masks.
    * ``"reference"``: :meth:`forward_reference` for every other call.

    NOTE: the reference path dequantizes both projections on every call, and with dynamic
    activations runs ``F.multi_head_attention_forward`` with an identity output projection to
    get the attention output, which costs one extra ``embed_dim`` x ``embed_dim`` matmul per
    token. Cross-attention, attention weights and training with dropout take it.
    """

    supports_static = False
    static_fallback = "dynamic"

    def __init__(
        self,
        module: nn.MultiheadAttention,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        weight_qparams: dict[str, QParams | None] | None = None,
    ) -> None:
        super().__init__(
            self.float_weights(module), weight_spec, None, activations, None, weight_qparams
        )
        self.embed_dim = module.embed_dim
        self.kdim = module.kdim
        self.vdim = module.vdim
        self._qkv_same_embed_dim = module._qkv_same_embed_dim
        self.num_heads = module.num_heads
        self.dropout = module.dropout
        self.batch_first = module.batch_first
        self.head_dim = module.head_dim
        self.add_zero_attn = module.add_zero_attn
        # Attention dropout follows the mode, so the copy starts in the float layer's mode.
        self.train(module.training)
        for name, tensor in (
            ("in_proj_bias", module.in_proj_bias),
            ("bias_k", module.bias_k),
            ("bias_v", module.bias_v),
            ("out_proj_bias", module.out_proj.bias),
        ):
            self.register_buffer(name, None if tensor is None else tensor.detach().clone())

    @classmethod
    def float_weights(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        """Return the projection matrices: packed or separate q/k/v, then ``out_proj_weight``."""
        if module._qkv_same_embed_dim:
            weights = {"in_proj_weight": module.in_proj_weight}
        else:
            weights = {
                "q_proj_weight": module.q_proj_weight,
                "k_proj_weight": module.k_proj_weight,
                "v_proj_weight": module.v_proj_weight,
            }
        weights["out_proj_weight"] = module.out_proj.weight
        return weights

    @classmethod
    def from_float(
        cls,
        module: nn.MultiheadAttention,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: dict[str, QParams | None] | None = None,
    ) -> QuantMultiheadAttention:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        ``input_qparams`` is accepted for a uniform signature and must be None.
        """
        if type(module) is not nn.MultiheadAttention:
            raise TypeError(
                f"{cls.__name__}.from_float expects MultiheadAttention, got "
                f"{type(module).__name__}."
            )
        if input_qparams is not None:
            raise ValueError(f"{cls.__name__} has no static input qparams; pass None.")
        return cls(module, weight_spec, activations, weight_qparams)

    def _quantize_qkv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Identity between query, key and value selects the packed projection in torch, so a
        # tensor passed twice is quantized once and passed twice.
        quantized_query = self.quantize_input(query)
        quantized_key = quantized_query if key is query else self.quantize_input(key)
        quantized_value = quantized_key if value is key else self.quantize_input(value)
        return quantized_query, quantized_key, quantized_value

    # ---- fast path -------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() and friends replace the buffers that the projection layers share.
        self.__dict__.pop("_projection_layers", None)
        return super()._apply(fn, recurse)

    def kernel_for(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> str:
        """Return the path ``forward`` takes for these arguments: ``projections`` or
        ``reference``."""
        fast = (
            query is key
            and key is value
            and query.dim() == 3
            and query.dtype == torch.float32
            and query.is_cpu
            and not need_weights
            and _masks_supported(
                key_padding_mask, attn_mask, is_causal, query, self.batch_first, self.num_heads
            )
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and not (self.training and self.dropout > 0.0)
            and not (query.requires_grad and torch.is_grad_enabled())
            and fast_kernels_enabled()
        )
        return PROJECTIONS if fast else REFERENCE

    def _projections(self) -> tuple[QuantLinear, QuantLinear]:
        """Return QuantLinear layers over the input and output projection buffers.

        They hold the same tensors as this layer (no copy), so their kernel caches follow
        in-place changes such as ``load_state_dict``. They are rebuilt when a buffer is replaced.
        """
        buffers = self._buffers
        names = ("in_proj_weight", "out_proj_weight")
        parts = ("codes", "scale", "zero_point")
        sources = (
            *(buffers[f"{name}_{part}"] for name in names for part in parts),
            buffers["in_proj_bias"],
            buffers["out_proj_bias"],
        )
        cached = self.__dict__.get("_projection_layers")
        if cached is not None and all(a is b for a, b in zip(cached[0], sources, strict=True)):
            return cached[1]
        layers = tuple(
            self._projection_layer(name, bias)
            for name, bias in zip(names, sources[6:], strict=True)
        )
        self.__dict__["_projection_layers"] = (sources, layers)
        return layers  # type: ignore[return-value]

    def _projection_layer(self, name: str, bias: torch.Tensor | None) -> QuantLinear:
        out_features, in_features = self.weight_shapes[name]
        scale = self._buffers[f"{name}_scale"]
        # Built on zeros with this layer's qparams, then pointed at this layer's buffers.
        layer = QuantLinear(
            torch.zeros(out_features, in_features, device=scale.device),
            None,
            self.weight_spec,
            self.activations,
            weight_qparams=(scale, self._zero_point(name)),
            activation_granularity=self.activation_granularity or "per_token",
        )
        for part in ("codes", "scale", "zero_point"):
            layer._buffers[f"weight_{part}"] = self._buffers[f"{name}_{part}"]
        layer._buffers["bias"] = bias
        # Errors from the projection name this attention layer, the one users configure.
        layer.__dict__[INNER_ATTRIBUTE] = True
        return layer

    def _forward_projections(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        in_projection, out_projection = self._projections()
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, _ = x.shape

        # The masks as F.multi_head_attention_forward combines them for
        # scaled_dot_product_attention: additive float masks, summed, and the is_causal hint
        # used in place of attn_mask only when there is no padding mask.
        scores_mask = None
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            is_causal = False
        if attn_mask is not None:
            shape = (1, 1, length, length) if attn_mask.dim() == 2 else (batch, -1, length, length)
            scores_mask = _additive_mask(attn_mask, x.dtype).view(shape)
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, x.dtype).view(batch, 1, 1, length)
            scores_mask = padding if scores_mask is None else scores_mask + padding

        qkv = in_projection(x).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = F.scaled_dot_product_attention(
            query, key, value, attn_mask=scores_mask, is_causal=is_causal
        )
        attention = attention.transpose(1, 2).reshape(batch, length, self.embed_dim)
        output = out_projection(attention)

        return output if self.batch_first else output.transpose(0, 1)

    @names_layer_in_input_errors
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        path = self.kernel_for(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if path == PROJECTIONS:
            return self._forward_projections(query, key_padding_mask, attn_mask, is_causal), None
        return self.forward_reference(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )

    def forward_reference(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute attention with dequantized projections, as the float layer's unfused path."""
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            # Transpose each distinct tensor once so that identities between them survive.
            transposed: dict[int, torch.Tensor] = {}
            query, key, value = (
                transposed.setdefault(id(x), x.transpose(1, 0)) for x in (query, key, value)
            )
        query, key, value = self._quantize_qkv(query, key, value)

        dtype = query.dtype
        out_weight = self.dequantized_weight(dtype, "out_proj_weight")
        out_bias = None if self.out_proj_bias is None else self.out_proj_bias.to(dtype)
        if self.activations is not None:
            out_weight = torch.eye(self.embed_dim, dtype=dtype, device=query.device)
        projections: dict[str, Any] = {}
        if self._qkv_same_embed_dim:
            projections["in_proj_weight"] = self.dequantized_weight(dtype, "in_proj_weight")
        else:
            projections["in_proj_weight"] = None
            projections["use_separate_proj_weight"] = True
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                projections[name] = self.dequantized_weight(dtype, name)
        in_proj_weight = projections.pop("in_proj_weight")

        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_proj_weight,
            None if self.in_proj_bias is None else self.in_proj_bias.to(dtype),
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_weight,
            None if self.activations is not None else out_bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            **projections,
        )
        if self.activations is not None:
            attn_output = F.linear(
                self.quantize_input(attn_output),
                self.dequantized_weight(dtype, "out_proj_weight"),
                out_bias,
            )
        if self.batch_first and is_batched:
            attn_output = attn_output.transpose(1, 0)
        return attn_output, attn_weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"batch_first={self.batch_first}, {super().extra_repr()}"
        )


def _masks_supported(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    batch_first: bool,
    num_heads: int,
) -> bool:
    """Return True when the projections path can apply these masks as the reference does.

    Each mask is absent or a bool or float32 CPU tensor: ``key_padding_mask`` of shape
    (batch, length), ``attn_mask`` of shape (length, length) or (batch * num_heads, length,
    length). ``is_causal`` needs ``attn_mask``, as in torch, where the reference raises without it.
    """
    batch, length = (query.shape[0], query.shape[1])
    if not batch_first:
        batch, length = length, batch
    masks = [(key_padding_mask, [(batch, length)])]
    masks.append((attn_mask, [(length, length), (batch * num_heads, length, length)]))
    for mask, shapes in masks:
        if mask is None:
            continue
        if mask.dtype not in (torch.bool, torch.float32) or not mask.is_cpu:
            return False
        if tuple(mask.shape) not in shapes:
            return False
    return attn_mask is not None or not is_causal


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``mask`` as scores to add: -inf at True entries of a bool mask, else ``mask``."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(mask, float("-inf"))


class CastMultiheadAttention(CastLayer):
    """A 16-bit copy of ``nn.MultiheadAttention`` that exposes the attributes parents read.

    ``nn.TransformerEncoderLayer`` reads ``self_attn.batch_first`` and similar attributes before
    it calls the attention layer, so they are forwarded to the wrapped copy.
    """

    def __getattr__(self, name: str) -> Any:
        if name in MHA_ATTRIBUTES:
            return getattr(self._modules["module"], name)
        return super().__getattr__(name)


def disable_fused_transformer_paths(model: nn.Module) -> list[str]:
    """Switch transformer layers of ``model`` to their unfused path; return their names.

    ``nn.TransformerEncoderLayer`` takes its fused path in eval mode only while
    ``activation_relu_or_gelu`` is set, and ``nn.TransformerEncoder`` converts inputs to nested
    tensors only while ``use_nested_tensor`` is True (torch 2.13). Clearing both makes the layers
    call their submodules, so swapped-in quantized or observed layers are used. The unfused path
    applies ``self.activation``, so the computed function does not change.
    """
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and module.activation_relu_or_gelu:
            module.activation_relu_or_gelu = 0
            changed.append(name)
        elif isinstance(module, nn.TransformerEncoder) and module.use_nested_tensor:
            module.use_nested_tensor = False
            changed.append(name)
    return changed
