"""Measure how many bytes a model's parameters and buffers take."""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch
from torch import nn


def model_size_bytes(model: nn.Module) -> int:
    """Sum ``numel * element_size`` over every parameter and buffer of ``model``.

    Each tensor counts at its stored dtype, so a ``uint8`` buffer of packed weights counts one
    byte per element and a float32 weight four. A tensor reached from several modules (tied
    weights, or two attributes viewing the same storage with the same offset, shape and stride)
    counts once. Tensors on the ``meta`` device have no storage and count by their declared
    ``numel * element_size``.

    NOTE: two different views into one storage (for example a weight and a slice of it) each
    count in full. A tensor subclass that packs its data internally counts at its logical
    ``numel * element_size``, which can differ from the bytes it really holds.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model_size_bytes() expects an nn.Module, but received {type(model).__name__}. "
            "Pass the model itself, not its state_dict or a tensor."
        )

    seen: set[Hashable] = set()
    total = 0
    for tensor in _parameters_and_buffers(model):
        key = _storage_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _parameters_and_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _storage_key(tensor: torch.Tensor) -> Hashable:
    """Return a key that is equal for two tensors exactly when they view the same bytes."""
    if tensor.is_meta:
        # Every meta tensor reports data_ptr 0, so storage identity cannot tell them apart.
        return ("object", id(tensor))
    try:
        data_ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        # Some tensor subclasses have no single storage to point at.
        return ("object", id(tensor))
    if data_ptr == 0:
        return ("object", id(tensor))
    return (
        "storage",
        str(tensor.device),
        data_ptr,
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )
