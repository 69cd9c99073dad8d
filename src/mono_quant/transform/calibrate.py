"""``calibrate``: run data through a prepared model so its observers record input ranges."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mono_quant.nn.observed import ObservedLayer
from mono_quant.transform.batches import model_device, move_to_device, split_batch
from mono_quant.transform.state import get_state

log = logging.getLogger(__name__)


def calibrate(
    model: nn.Module, data: Iterable[Any], max_batches: int | None = None, sync: bool = True
) -> int:
    """Run batches of ``data`` through ``model`` in eval mode; return how many ran.

    Batches are ``(input, target)`` pairs, bare inputs or mappings (see ``split_batch``); only
    the input is used, as ``model(input)``. With ``sync`` and ``torch.distributed`` initialized,
    observer ranges are then combined across ranks so every rank ends with the same ranges.

    Raises:
        ValueError: when the model was not prepared, ``max_batches`` is not positive, or
            ``data`` yields no batch.
    """
    if get_state(model) is None:
        raise ValueError(
            f"{type(model).__name__} is not prepared; call mono_quant.prepare(model, config) first."
        )
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches={max_batches} must be positive or None.")

    observed = [module for module in model.modules() if isinstance(module, ObservedLayer)]
    device = model_device(model)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in data:
                if max_batches is not None and count >= max_batches:
                    break
                inputs, _ = split_batch(batch)
                try:
                    model(move_to_device(inputs, device))
                except (RuntimeError, TypeError) as error:
                    # Name the batch, because a shape error from deep inside the model does not.
                    raise type(error)(
                        f"calibration batch {count} failed in {type(model).__name__}.forward: "
                        f"{error}. Check that the calibration data yields the same inputs as "
                        "training."
                    ) from error
                count += 1
    finally:
        model.train(was_training)

    if count == 0:
        raise ValueError(
            "the calibration data yielded no batches; pass a non-empty DataLoader or iterable "
            "(check its length, drop_last and the sampler)."
        )
    if sync:
        for layer in observed:
            layer.input_observer.sync()
    log.info("Calibrated %d layers on %d batches.", len(observed), count)
    return count
