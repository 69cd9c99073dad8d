"""Reshape tensors into blocks that share one ``scale``/``zero_point``, and back.

Every quantization function works on a "blocked" view ``(*qparams_shape, block)`` whose last
dimension holds the elements of one block, so that min/max reductions run over ``dim=-1`` and
qparams broadcast with ``unsqueeze(-1)``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

from mono_quant.core.spec import QuantSpec


def _row_length(shape: torch.Size) -> int:
    return math.prod(shape[1:])


def _check_rank(x: torch.Tensor, spec: QuantSpec) -> None:
    if spec.granularity == "per_channel" and not -x.dim() <= spec.axis < x.dim():
        raise ValueError(
            f"per_channel axis={spec.axis} is out of range for a tensor of shape "
            f"{tuple(x.shape)}; use an axis from {-x.dim()} to {x.dim() - 1}."
        )
    if spec.granularity == "per_group" and x.dim() < 2:
        raise ValueError(
            f"per_group needs a tensor with at least two dimensions (rows of groups), got shape "
            f"{tuple(x.shape)}; use per_tensor or per_channel for vectors and scalars."
        )
    if spec.granularity == "per_token" and x.dim() < 1:
        raise ValueError("per_token needs a tensor with at least one dimension, got a 0-d tensor.")


def qparams_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Return the shape of ``scale`` and ``zero_point`` for a tensor of ``shape``."""
    shape = torch.Size(shape)
    if spec.granularity == "per_tensor":
        return ()
    if spec.granularity == "per_channel":
        return (shape[spec.axis],)
    if spec.granularity == "per_group":
        group_size = cast(int, spec.group_size)
        return (shape[0], math.ceil(_row_length(shape) / group_size))
    return tuple(shape[:-1])


def to_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Return ``x`` as ``(*qparams_shape, block)``; per_group pads the last group with zeros.

    Zero padding never changes a block's range because every range is widened to include 0.
    """
    _check_rank(x, spec)
    if spec.granularity == "per_tensor":
        return x.reshape(-1)
    if spec.granularity == "per_channel":
        moved = x.movedim(spec.axis, 0)
        return moved.reshape(moved.shape[0], -1)
    if spec.granularity == "per_group":
        group_size = cast(int, spec.group_size)
        rows = x.reshape(x.shape[0], -1)
        padding = -rows.shape[1] % group_size
        if padding:
            rows = F.pad(rows, (0, padding))
        return rows.reshape(rows.shape[0], -1, group_size)
    return x


def from_blocks(blocks: torch.Tensor, spec: QuantSpec, shape: torch.Size) -> torch.Tensor:
    """Invert :func:`to_blocks` for a tensor of the original ``shape``."""
    if spec.granularity == "per_tensor":
        return blocks.reshape(shape)
    if spec.granularity == "per_channel":
        moved_shape = list(shape)
        moved_shape.insert(0, moved_shape.pop(spec.axis))
        return blocks.reshape(moved_shape).movedim(0, spec.axis)
    if spec.granularity == "per_group":
        rows = blocks.reshape(blocks.shape[0], -1)
        return rows[:, : _row_length(shape)].reshape(shape)
    return blocks
