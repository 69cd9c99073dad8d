"""Per-layer sensitivity: quantize one layer at a time and measure what it costs."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics import Metric, MetricCollection

from mono_quant.config import QuantConfig, resolve_config
from mono_quant.evaluate.compare import compare
from mono_quant.evaluate.errors import sqnr_db_from_power
from mono_quant.evaluate.monitor import resolve_monitor
from mono_quant.evaluate.plot import plot_sensitivity
from mono_quant.transform import quantization_report, quantize
from mono_quant.transform.select import select_layers


@dataclass
class LayerSensitivity:
    """Cost of quantizing one layer alone: metric changes, bytes saved and output SQNR."""

    name: str
    type_name: str
    parameters: int
    bytes_saved: int
    metric_change: dict[str, float]
    output_sqnr_db: float


@dataclass
class SensitivityReport:
    """Layers ranked from most to least sensitive, for one config and one monitored metric."""

    config: dict[str, Any]
    monitor: str | None
    float_metrics: dict[str, float]
    layers: list[LayerSensitivity] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Return the ranking as plain values: config, monitor, float metrics, one dict a layer."""
        return {
            "config": self.config,
            "monitor": self.monitor,
            "float_metrics": self.float_metrics,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def table(self) -> Table:
        """Return a rich table with one row per layer, most sensitive first."""
        change = f"{self.monitor} change" if self.monitor else "metric change"
        table = Table(title=f"sensitivity ({QuantConfig(**self.config).label})")
        for column in ("layer", "type", "parameters", "bytes saved", change, "output SQNR (dB)"):
            table.add_column(column, justify="left" if column in ("layer", "type") else "right")
        for layer in self.layers:
            value = layer.metric_change.get(self.monitor) if self.monitor else None
            table.add_row(
                layer.name,
                layer.type_name,
                f"{layer.parameters:,}",
                f"{layer.bytes_saved:,}",
                "-" if value is None else f"{value:+.4f}",
                f"{layer.output_sqnr_db:.2f}",
            )
        return table

    def plot(self, path: str | os.PathLike[str], metric: str | None = None) -> Path:
        """Write a PNG bar chart with one bar per layer, in this ranking, and return its path.

        ``metric`` is the metric whose change each bar shows, or ``"output_sqnr_db"`` for the
        layers' output SQNR. The default is :attr:`monitor`, or the SQNR when there is none.
        Needs matplotlib (``pip install 'mono-quant[plot]'``), and raises ``ImportError``
        without it. See :func:`mono_quant.evaluate.plot.plot_sensitivity`.
        """
        return plot_sensitivity(self, path, metric)

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=110, color_system=None).print(self.table())
        return buffer.getvalue()


class _OutputError:
    """Forward hooks that add up a layer's float and quantized output powers batch by batch."""

    def __init__(self, float_layer: nn.Module, quantized_layer: nn.Module) -> None:
        self.reference: list[torch.Tensor] = []
        self.signal = 0.0
        self.noise = 0.0
        self.handles = [
            float_layer.register_forward_hook(self._record_reference),
            quantized_layer.register_forward_hook(self._record_test),
        ]

    @staticmethod
    def _first_tensor(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, (tuple, list)) else output

    def _record_reference(self, module: nn.Module, args: Any, output: Any) -> None:
        self.reference.append(self._first_tensor(output).detach().double())

    def _record_test(self, module: nn.Module, args: Any, output: Any) -> None:
        # compare() runs the float model first on each batch, so references are consumed in order.
        reference = self.reference.pop(0)
        test = self._first_tensor(output).detach().double().to(reference.device)
        self.signal += float(reference.square().sum())
        self.noise += float((reference - test).square().sum())

    def sqnr_db(self) -> float:
        for handle in self.handles:
            handle.remove()
        return sqnr_db_from_power(self.signal, self.noise)


def _sort_key(layer: LayerSensitivity, monitor: str | None, higher_is_better: bool) -> tuple:
    change = layer.metric_change.get(monitor, 0.0) if monitor else 0.0
    loss = -change if higher_is_better else change
    return (-loss if not math.isnan(loss) else -math.inf, layer.output_sqnr_db)


def sensitivity(
    model: nn.Module,
    config: QuantConfig | str | None,
    calibration_data: Iterable[Any] | None,
    dataloader: Iterable[Any],
    metrics: Metric | MetricCollection | None = None,
    monitor: str | None = None,
    max_batches: int | None = None,
) -> SensitivityReport:
    """Quantize each selected layer on its own and rank the layers by what that costs.

    For every layer that ``config`` selects, a copy of ``model`` with only that layer quantized
    is compared with the float model on ``dataloader``. Each row records the change of every
    metric and the bytes the layer saves. It also records the SQNR of the layer's own output, a
    cheaper proxy that needs no labels.
    Layers are sorted most sensitive first: by the loss on ``monitor`` (the direction follows the
    metric's ``higher_is_better``), then by lower SQNR.

    Args:
        model: the float model; it is not modified.
        config: a :class:`QuantConfig` or preset name, as for :func:`mono_quant.quantize`.
        calibration_data: batches for static activation ranges (``None`` for other configs).
        dataloader: evaluation batches, ``(input, target)`` pairs when metrics need targets.
        metrics: torchmetrics metric or collection; default as in :func:`mono_quant.compare`.
        monitor: the metric name to rank by (a unique prefix such as ``"acc"`` works); default
            the first metric.
        max_batches: evaluate on at most this many batches.

    Raises:
        ValueError: when ``monitor`` is not one of the metric names, or no layer is selected.
    """
    config = resolve_config(config)
    names = [d.name for d in select_layers(model, config.include, config.exclude) if d.quantize]
    if not names:
        raise ValueError(
            f"config {config.label!r} selects no layer of {type(model).__name__}; check include "
            "and exclude."
        )

    layers = []
    float_metrics: dict[str, float] = {}
    higher_is_better = True
    for name in names:
        layer_config = config.replace(include=(name,), exclude=None)
        quantized = quantize(model, layer_config, calibration_data=calibration_data)
        probe = _OutputError(model.get_submodule(name), quantized.get_submodule(name))
        run_metrics = metrics.clone() if metrics is not None else None
        report = compare(model, quantized, dataloader, metrics=run_metrics, max_batches=max_batches)
        output_sqnr = probe.sqnr_db()

        float_metrics = report.float_metrics
        if report.float_metrics:
            monitor = resolve_monitor(monitor, report.float_metrics)
        elif monitor is not None:
            raise ValueError(
                f"monitor={monitor!r} was given, but no task metric was computed; pass "
                "metrics=... and evaluation batches with targets, or drop monitor."
            )
        if isinstance(metrics, Metric) and metrics.higher_is_better is False:
            higher_is_better = False
        elif isinstance(metrics, MetricCollection) and monitor in metrics:
            higher_is_better = metrics[monitor].higher_is_better is not False

        row = quantization_report(quantized).quantized_layers
        layers.append(
            LayerSensitivity(
                name=name,
                type_name=type(model.get_submodule(name)).__name__,
                parameters=sum(p.numel() for p in model.get_submodule(name).parameters()),
                bytes_saved=sum(r.float_bytes - r.quantized_bytes for r in row),
                metric_change={
                    key: report.quantized_metrics[key] - value
                    for key, value in report.float_metrics.items()
                },
                output_sqnr_db=output_sqnr,
            )
        )

    layers.sort(key=lambda layer: _sort_key(layer, monitor, higher_is_better))
    return SensitivityReport(
        config=config.to_dict(), monitor=monitor, float_metrics=float_metrics, layers=layers
    )
