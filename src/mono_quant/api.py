"""``mono_quant.quantize``: one call for plain quantization and for a metric budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torchmetrics import Metric, MetricCollection

from mono_quant.config import QuantConfig
from mono_quant.evaluate.budget import quantize_with_budget
from mono_quant.transform import quantize as quantize_layers


def quantize(
    model: nn.Module,
    config: QuantConfig | str | None = "w8a8",
    calibration_data: Iterable[Any] | None = None,
    inplace: bool = False,
    calibration_batches: int | None = None,
    *,
    max_metric_drop: float | None = None,
    eval_data: Iterable[Any] | None = None,
    metrics: Metric | MetricCollection | None = None,
    monitor: str | None = None,
    max_batches: int | None = None,
) -> nn.Module:
    """Return a quantized copy of ``model`` (or ``model`` itself, changed, when ``inplace``).

    Without ``max_metric_drop`` every selected layer gets ``config``. With it, layers move to
    wider formats (int8, then float), most sensitive first, until ``monitor`` drops by at most
    ``max_metric_drop`` on ``eval_data``; :func:`mono_quant.budget_report` returns what moved.

    Args:
        model: any ``nn.Module``; supported layers are replaced, others stay in float and are
            listed by :func:`mono_quant.quantization_report`.
        config: a :class:`QuantConfig` or a preset name such as ``"w8a8"``, ``"w8"``, ``"w4"``.
        calibration_data: batches for static activation ranges: a DataLoader or any iterable of
            ``(input, target)`` pairs, inputs, or mappings. Ignored by other configs.
        inplace: change ``model`` instead of a deep copy (not with ``max_metric_drop``).
        calibration_batches: stop calibration after this many batches (``None``: all).
        max_metric_drop: the largest allowed drop of ``monitor``, in the metric's units.
        eval_data: batches with targets to measure the metric on; default
            ``calibration_data``.
        metrics: torchmetrics metric or collection; default accuracy for class scores.
        monitor: the metric to hold; a unique prefix such as ``"acc"`` works.
        max_batches: evaluate on at most this many batches.

    Raises:
        ValueError: when the config uses static activations and ``calibration_data`` is None,
            or a budget is asked for without evaluation data or together with ``inplace``.
    """
    if max_metric_drop is None:
        extra = {"eval_data": eval_data, "metrics": metrics, "monitor": monitor}
        given = [name for name, value in extra.items() if value is not None]
        if given:
            raise ValueError(
                f"{given} only apply to a metric budget; pass max_metric_drop as well, or "
                "drop them."
            )
        return quantize_layers(model, config, calibration_data, inplace, calibration_batches)

    if inplace:
        raise ValueError(
            "inplace=True cannot be combined with max_metric_drop: the search builds several "
            "candidate models from the float one. Drop inplace."
        )
    eval_data = calibration_data if eval_data is None else eval_data
    if eval_data is None:
        raise ValueError(
            "max_metric_drop needs data to measure the metric on; pass eval_data (batches "
            "with targets) or calibration_data."
        )
    quantized, _ = quantize_with_budget(
        model,
        config,
        calibration_data,
        eval_data,
        max_metric_drop,
        metrics=metrics,
        monitor=monitor,
        max_batches=max_batches,
        calibration_batches=calibration_batches,
    )
    return quantized
