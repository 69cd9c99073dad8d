"""Split dataloader batches into the model input and the target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

INPUT_KEYS = ("input", "inputs", "x")
TARGET_KEYS = ("target", "targets", "label", "labels", "y")

_HOW_TO_ADAPT = (
    "Yield (input, target) pairs, a bare input tensor, or a mapping with an input key "
    f"{INPUT_KEYS} and an optional target key {TARGET_KEYS}; a `collate_fn` on the "
    "DataLoader can reshape other batches into one of these forms."
)


def split_batch(batch: Any) -> tuple[Any, Any | None]:
    """Return ``(input, target)`` for one batch; ``target`` is ``None`` when the batch has none.

    Accepted forms: a tensor (input only), a tuple or list ``(input, target, ...)`` whose extra
    items are ignored, and a mapping with one of ``INPUT_KEYS`` and optionally one of
    ``TARGET_KEYS``.

    Raises:
        TypeError: for any other batch form, with the ways to adapt it.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None

    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise TypeError(f"Received an empty {type(batch).__name__} as a batch. {_HOW_TO_ADAPT}")
        target = batch[1] if len(batch) > 1 else None
        return batch[0], target

    if isinstance(batch, Mapping):
        input_key = next((key for key in INPUT_KEYS if key in batch), None)
        if input_key is None:
            raise TypeError(
                f"Received a batch mapping with keys {sorted(map(str, batch))} but none of the "
                f"input keys {INPUT_KEYS}. {_HOW_TO_ADAPT}"
            )
        target_key = next((key for key in TARGET_KEYS if key in batch), None)
        return batch[input_key], batch[target_key] if target_key is not None else None

    raise TypeError(f"Received a batch of type {type(batch).__name__}. {_HOW_TO_ADAPT}")


def move_to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor inside ``data`` (nested tuples, lists, mappings) to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {key: move_to_device(value, device) for key, value in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(move_to_device(value, device) for value in data)
    return data


def model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer, or the CPU when it has none."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
