"""Hold the result of comparing a float model with its quantized copy, and render it as a table."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass
class ComparisonReport:
    """Task metrics, sizes and output error figures of a float model and its quantized copy.

    ``output_sqnr_db`` compares the quantized model's outputs with the float model's outputs
    over all batches (higher is better). It is ``inf`` for identical outputs and ``nan`` when
    an output contains NaN. ``top1_agreement`` is ``None`` unless the outputs are class scores
    of shape ``(N, C)`` with ``C >= 2``.
    """

    float_metrics: dict[str, float]
    quantized_metrics: dict[str, float]
    float_size_bytes: int
    quantized_size_bytes: int
    output_sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None
    num_samples: int
    num_batches: int
    title: str = "float vs quantized"
    # Column header of the reference model, e.g. "fake-quant" when QAT compares against it.
    reference_label: str = "float"

    @property
    def size_ratio(self) -> float:
        """Quantized size divided by float size, or ``nan`` when the float model has no bytes."""
        if self.float_size_bytes == 0:
            return math.nan
        return self.quantized_size_bytes / self.float_size_bytes

    @property
    def output_has_nan(self) -> bool:
        """Whether the output SQNR is NaN, which happens when an output contains NaN."""
        return math.isnan(self.output_sqnr_db)

    def metric_names(self) -> list[str]:
        """Return the metric names of both models, float model's order first, without repeats."""
        names = list(self.float_metrics)
        names += [name for name in self.quantized_metrics if name not in self.float_metrics]
        return names

    def summary(self) -> dict[str, Any]:
        """Return the figures as one flat dict of floats and ints, ready for ``json.dumps``.

        Keys: ``float/<metric>``, ``quantized/<metric>``, ``delta/<metric>`` (quantized minus
        float, only when both models have the metric), ``size/float_bytes``,
        ``size/quantized_bytes``, ``size/ratio`` (quantized / float), ``output/sqnr_db``,
        ``output/max_abs_error``, ``output/top1_agreement`` (only when measured),
        ``num_samples`` and ``num_batches``.

        NOTE: an infinite SQNR or a NaN stays a float ``inf``/``nan``. ``json.dumps`` writes
        those as ``Infinity``/``NaN``, which strict JSON parsers reject.
        """
        summary: dict[str, Any] = {}
        for name in self.metric_names():
            float_value = self.float_metrics.get(name)
            quantized_value = self.quantized_metrics.get(name)
            if float_value is not None:
                summary[f"float/{name}"] = float_value
            if quantized_value is not None:
                summary[f"quantized/{name}"] = quantized_value
            if float_value is not None and quantized_value is not None:
                summary[f"delta/{name}"] = quantized_value - float_value

        summary["size/float_bytes"] = self.float_size_bytes
        summary["size/quantized_bytes"] = self.quantized_size_bytes
        summary["size/ratio"] = self.size_ratio
        summary["output/sqnr_db"] = self.output_sqnr_db
        summary["output/max_abs_error"] = self.max_abs_error
        if self.top1_agreement is not None:
            summary["output/top1_agreement"] = self.top1_agreement
        summary["num_samples"] = self.num_samples
        summary["num_batches"] = self.num_batches
        return summary

    def table(self) -> Table:
        """Build a rich table with the columns figure, float, quantized and change."""
        table = Table(
            title=self.title,
            caption=f"{self.num_samples} samples in {self.num_batches} "
            f"{'batch' if self.num_batches == 1 else 'batches'}",
        )
        table.add_column("figure")
        table.add_column(self.reference_label, justify="right")
        table.add_column("quantized", justify="right")
        table.add_column("change", justify="right")

        for name in self.metric_names():
            float_value = self.float_metrics.get(name)
            quantized_value = self.quantized_metrics.get(name)
            change = ""
            if float_value is not None and quantized_value is not None:
                change = f"{quantized_value - float_value:+.4f}"
            table.add_row(
                name, _format_metric(float_value), _format_metric(quantized_value), change
            )

        table.add_section()
        table.add_row(
            "size",
            format_bytes(self.float_size_bytes),
            format_bytes(self.quantized_size_bytes),
            _format_ratio(self.size_ratio),
        )
        table.add_row("output SQNR (dB)", "", _format_sqnr(self.output_sqnr_db), "")
        table.add_row("max abs error", "", f"{self.max_abs_error:.4g}", "")
        if self.top1_agreement is not None:
            table.add_row("top-1 agreement", "", f"{self.top1_agreement:.4f}", "")
        return table

    def __str__(self) -> str:
        """Render the table as plain text, 100 columns wide, without colour codes."""
        buffer = io.StringIO()
        console = Console(file=buffer, width=100, color_system=None)
        console.print(self.table())
        return buffer.getvalue()


def format_bytes(num_bytes: int) -> str:
    """Format a byte count with binary units, e.g. ``1536`` as ``1.50 KiB``."""
    value = float(num_bytes)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{num_bytes} B"
    return f"{value:.2f} {unit}"


def _format_metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _format_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return "n/a"
    if 0 < ratio < 1:
        return f"x{ratio:.3f} ({1 / ratio:.2f}x smaller)"
    return f"x{ratio:.3f}"


def _format_sqnr(value: float) -> str:
    if math.isnan(value):
        return "nan (NaN in outputs)"
    return f"{value:.2f}"
