"""PNG bar charts of a :class:`~mono_quant.evaluate.sensitivity.SensitivityReport`.

matplotlib is an optional dependency (the ``plot`` extra), imported only when a chart is drawn.
The chart is drawn on a standalone ``Figure`` with the Agg canvas, so it never touches pyplot's
global state or the backend the caller selected.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mono_quant.config import QuantConfig

if TYPE_CHECKING:
    from mono_quant.evaluate.sensitivity import SensitivityReport

__all__ = ["FIGURE_DPI", "FIGURE_WIDTH_INCHES", "SQNR_METRIC", "figure_size", "plot_sensitivity"]

# Value of ``metric`` that plots each layer's output SQNR instead of a metric change.
SQNR_METRIC = "output_sqnr_db"

FIGURE_WIDTH_INCHES = 8.0
FIGURE_DPI = 100
# One bar row per layer plus room for the title and the x axis, with a floor for short reports.
_INCHES_PER_LAYER = 0.3
_MARGIN_INCHES = 1.5
_MIN_HEIGHT_INCHES = 3.0


def figure_size(num_layers: int) -> tuple[float, float]:
    """Return the ``(width, height)`` in inches of a chart with ``num_layers`` bars."""
    height = max(_MIN_HEIGHT_INCHES, _MARGIN_INCHES + _INCHES_PER_LAYER * num_layers)
    return FIGURE_WIDTH_INCHES, height


def _import_matplotlib() -> tuple[Any, Any]:
    """Return matplotlib's ``Figure`` and ``FigureCanvasAgg`` classes."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "SensitivityReport.plot() needs matplotlib, which is missing. Install it with "
            "pip install 'mono-quant[plot]'."
        ) from error
    return Figure, FigureCanvasAgg


def _resolve_metric(report: SensitivityReport, metric: str | None) -> str:
    if metric is None:
        return report.monitor or SQNR_METRIC
    if metric != SQNR_METRIC and metric not in report.float_metrics:
        choices = sorted([*report.float_metrics, SQNR_METRIC])
        raise ValueError(f"metric={metric!r} is not in this report; use one of {choices}.")
    return metric


def _axis_label(report: SensitivityReport, metric: str) -> str:
    if metric == SQNR_METRIC:
        return "layer output SQNR (dB), higher is better"
    return f"{metric} change, quantized minus float (float: {report.float_metrics[metric]:.4g})"


def plot_sensitivity(
    report: SensitivityReport, path: str | os.PathLike[str], metric: str | None = None
) -> Path:
    """Write a PNG bar chart of ``report`` to ``path``, one bar per layer, and return the path.

    Bars are in the report's order, most sensitive at the top. Each bar is the layer's change of
    ``metric`` (quantized minus float), or its output SQNR when ``metric`` is
    ``"output_sqnr_db"``. The default is the report's monitored metric, or the output SQNR when
    the report has none. A non-finite value (an infinite SQNR of an exact layer, a NaN metric)
    gets no bar and is written as text instead. The file is PNG whatever the suffix of
    ``path``, and its size in pixels is :func:`figure_size` times :data:`FIGURE_DPI`.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when ``metric`` is not in the report, or the report has no layers.
    """
    if not report.layers:
        raise ValueError("the sensitivity report has no layers, so there is nothing to plot.")
    metric = _resolve_metric(report, metric)
    figure_class, canvas_class = _import_matplotlib()

    names = [layer.name for layer in report.layers]
    if metric == SQNR_METRIC:
        values = [layer.output_sqnr_db for layer in report.layers]
    else:
        values = [layer.metric_change.get(metric, math.nan) for layer in report.layers]
    finite = [value if math.isfinite(value) else math.nan for value in values]

    figure = figure_class(figsize=figure_size(len(names)), dpi=FIGURE_DPI, layout="constrained")
    canvas_class(figure)
    axes = figure.add_subplot()
    positions = list(range(len(names)))
    axes.barh(positions, finite, color="tab:blue")
    for position, value in zip(positions, values, strict=True):
        if not math.isfinite(value):
            axes.text(0, position, f" {value}", va="center", ha="left")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(positions, names)
    # Row 0 is the most sensitive layer, and inverting the axis puts it at the top.
    axes.invert_yaxis()
    axes.set_xlabel(_axis_label(report, metric))
    axes.set_ylabel("layer (most sensitive first)")
    axes.set_title(f"sensitivity ({QuantConfig(**report.config).label})")

    path = Path(path)
    figure.savefig(path, format="png", dpi=FIGURE_DPI)
    return path
