"""``quantize``: prepare, calibrate and convert in one call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from mono_quant.config import QuantConfig, resolve_config
from mono_quant.transform.calibrate import calibrate
from mono_quant.transform.convert import convert
from mono_quant.transform.prepare import prepare
from mono_quant.transform.state import get_state


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None = "w8a8",
    calibration_data: Iterable[Any] | None = None,
    inplace: bool = False,
    calibration_batches: int | None = None,
) -> nn.Module:
    """Return a quantized copy of ``model`` (or ``model`` itself, changed, when ``inplace``).

    Args:
        model: any ``nn.Module``; supported layers are replaced, others stay in float and are
            listed by :func:`mono_quant.quantization_report`.
        config: a :class:`QuantConfig` or a preset name such as ``"w8a8"``, ``"w8"``, ``"w4"``.
        calibration_data: batches for static activation ranges: a DataLoader or any iterable of
            ``(input, target)`` pairs, inputs, or mappings. Ignored by other configs.
        inplace: change ``model`` instead of a deep copy.
        calibration_batches: stop calibration after this many batches (``None``: all).

    Raises:
        ValueError: when the config uses static activations and ``calibration_data`` is None.
    """
    config = resolve_config(config)
    if calibration_batches is not None and calibration_batches <= 0:
        raise ValueError(
            f"calibration_batches={calibration_batches} must be a positive number of batches, "
            "or None to use every batch of calibration_data."
        )
    if config.calibrates_any_layer and calibration_data is None:
        raise ValueError(
            f"config {config.label!r} uses static activations, whose ranges come from "
            "calibration data; pass calibration_data (a DataLoader or an iterable of batches), "
            "or use activations='dynamic' or None (presets 'w8a8-dynamic', 'w8')."
        )

    prepared = prepare(model, config, inplace=inplace)
    if get_state(prepared).needs_calibration:
        calibrate(prepared, calibration_data, max_batches=calibration_batches)  # type: ignore[arg-type]
    return convert(prepared, inplace=True)
