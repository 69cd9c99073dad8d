"""Metric budget: widen the most sensitive layers until the metric drop fits the budget.

The search quantizes every selected layer with the base config first. When the monitored
metric drops by more than the budget, it ranks the layers with :func:`sensitivity` and moves
them, most sensitive first, one step up a ladder of wider formats (by default int4, then int8
per channel, then float). It evaluates after each move and stops at the first mix that meets
the budget. A pruning pass then tries to move each widened layer back down, least sensitive
first, and keeps every move back that still meets the budget.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics import Metric, MetricCollection

from mono_quant.config import QuantConfig, resolve_config
from mono_quant.evaluate.compare import compare
from mono_quant.evaluate.monitor import check_max_metric_drop, resolve_monitor
from mono_quant.evaluate.report import ComparisonReport
from mono_quant.evaluate.sensitivity import SensitivityReport, sensitivity
from mono_quant.transform import quantize
from mono_quant.transform.state import get_state

log = logging.getLogger(__name__)

# A step of the ladder: field changes for the layers at that step, or None for float.
Step = Mapping[str, Any] | None

# Drops of equal mixes differ by float rounding only, so a drop equal to the budget still meets it.
_DROP_TOLERANCE = 1e-9


def default_ladder(config: QuantConfig) -> list[Step]:
    """Return the wider formats above ``config``: int8 per channel (below 8 bits), then float."""
    ladder: list[Step] = []
    if config.is_integer and config.bits < 8:
        ladder.append({"bits": 8, "granularity": "per_channel"})
    ladder.append(None)
    return ladder


@dataclass
class LayerMove:
    """One layer that the search left wider than the base config."""

    name: str
    type_name: str
    to_format: str
    metric_change_alone: float


@dataclass
class BudgetReport:
    """Outcome of a budgeted quantization: which layers moved, the metric, the drop and size."""

    monitor: str
    higher_is_better: bool
    max_metric_drop: float
    base_format: str
    float_metric: float
    base_metric: float
    metric: float
    drop: float
    met: bool
    float_size_bytes: int
    size_bytes: int
    evaluations: int
    moved: list[LayerMove] = field(default_factory=list)
    dominant: list[str] = field(default_factory=list)
    sensitivity: SensitivityReport | None = None

    @property
    def base_drop(self) -> float:
        """The drop with every selected layer at the base format."""
        return _drop(self.float_metric, self.base_metric, self.higher_is_better)

    @property
    def size_ratio(self) -> float:
        """Stored size of the chosen model over the float model."""
        return self.size_bytes / self.float_size_bytes if self.float_size_bytes else math.nan

    def summary(self) -> dict[str, Any]:
        """Return the outcome as plain values, for logs and JSON."""
        values = asdict(self)
        values.pop("sensitivity")
        values["base_drop"] = self.base_drop
        values["size_ratio"] = self.size_ratio
        return values

    def table(self) -> Table:
        """Return a rich table: the outcome first, then one row per moved layer."""
        verdict = "met" if self.met else "NOT met"
        table = Table(
            title=(
                f"metric budget {verdict}: {self.monitor} drop {self.drop:+.4f} "
                f"(budget {self.max_metric_drop:.4f}, {self.base_format} everywhere: "
                f"{self.base_drop:+.4f})"
            )
        )
        for column in ("layer", "type", "format", f"{self.monitor} change alone"):
            table.add_column(column, justify="right" if "change" in column else "left")
        for move in self.moved:
            table.add_row(
                move.name, move.type_name, move.to_format, f"{move.metric_change_alone:+.4f}"
            )
        table.caption = (
            f"float {self.monitor} {self.float_metric:.4f} -> {self.metric:.4f}; size "
            f"{self.size_bytes:,} of {self.float_size_bytes:,} bytes ({self.size_ratio:.3f}x); "
            f"{len(self.moved)} layer(s) widened, {self.evaluations} evaluations"
        )
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=110, color_system=None).print(self.table())
        if not self.met:
            buffer.write(
                f"No mix met the budget; the layers that cost the most alone: {self.dominant}.\n"
            )
        return buffer.getvalue()


def _drop(float_metric: float, metric: float, higher_is_better: bool) -> float:
    return float_metric - metric if higher_is_better else metric - float_metric


def _higher_is_better(
    metrics: Metric | MetricCollection | None, monitor: str, override: bool | None
) -> bool:
    if override is not None:
        return override
    metric: Any = None
    if isinstance(metrics, MetricCollection) and monitor in metrics:
        metric = metrics[monitor]
    elif isinstance(metrics, Metric):
        metric = metrics
    if metric is None:
        # The default metric is accuracy.
        return True
    if metric.higher_is_better is None:
        raise ValueError(
            f"{type(metric).__name__} does not say whether higher is better "
            "(higher_is_better is None); pass higher_is_better=True or False."
        )
    return bool(metric.higher_is_better)


class _Search:
    """One budget search: evaluates candidate mixes and remembers the best one."""

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        ladder: Sequence[Step],
        calibration_data: Iterable[Any] | None,
        eval_data: Iterable[Any],
        metrics: Metric | MetricCollection | None,
        max_batches: int | None,
        calibration_batches: int | None,
    ) -> None:
        self.model = model
        self.config = config
        self.ladder = list(ladder)
        self.calibration_data = calibration_data
        self.eval_data = eval_data
        self.metrics = metrics
        self.max_batches = max_batches
        self.calibration_batches = calibration_batches
        self.evaluations = 0

    def build(self, levels: Mapping[str, int]) -> nn.Module:
        """Quantize the model with each named layer at its ladder level (0 is the base)."""
        overrides: dict[str, Any] = {}
        for name, level in levels.items():
            if level > 0:
                step = self.ladder[level - 1]
                overrides[name] = None if step is None else dict(step)
        config = self.config.replace(overrides=overrides or None)
        return quantize(
            self.model,
            config,
            calibration_data=self.calibration_data,
            calibration_batches=self.calibration_batches,
        )

    def evaluate(self, quantized: nn.Module) -> ComparisonReport:
        """Compare ``quantized`` with the float model on the evaluation data."""
        self.evaluations += 1
        metrics = self.metrics.clone() if self.metrics is not None else None
        return compare(
            self.model, quantized, self.eval_data, metrics=metrics, max_batches=self.max_batches
        )


def quantize_with_budget(
    model: nn.Module,
    config: QuantConfig | str | None,
    calibration_data: Iterable[Any] | None,
    eval_data: Iterable[Any],
    max_metric_drop: float,
    metrics: Metric | MetricCollection | None = None,
    monitor: str | None = None,
    higher_is_better: bool | None = None,
    ladder: Sequence[Step] | None = None,
    max_batches: int | None = None,
    calibration_batches: int | None = None,
    broadcast: Callable[[Any], Any] | None = None,
) -> tuple[nn.Module, BudgetReport]:
    """Quantize ``model`` as small as the search finds within a metric budget on ``monitor``.

    The drop is measured in the metric's own units on ``eval_data``: ``max_metric_drop=0.01``
    allows an accuracy of 0.97 when the float model scores 0.98. Its direction follows the
    metric's ``higher_is_better``.

    Args:
        model: the float model; it is not modified.
        config: the base config for every selected layer (the narrowest format tried).
        calibration_data: batches for static activation ranges (``None`` for other configs).
        eval_data: evaluation batches, ``(input, target)`` pairs for task metrics.
        max_metric_drop: the largest allowed drop of ``monitor``, at least 0.
        metrics: torchmetrics metric or collection; default accuracy for class scores.
        monitor: the metric name to hold (a unique prefix works); default the first metric.
        higher_is_better: overrides the metric's own direction.
        ladder: wider formats to move layers to, narrowest first: field changes such as
            ``{"bits": 8, "granularity": "per_channel"}``, or ``None`` for float. Default
            :func:`default_ladder`.
        max_batches: evaluate on at most this many batches.
        calibration_batches: calibrate on at most this many batches.
        broadcast: under torch.distributed, a function that returns rank zero's copy of a
            value (Lightning's ``trainer.strategy.broadcast``). The layer ranking goes through
            it, so every process builds the same candidates.

    Returns:
        The best model found and its :class:`BudgetReport`. When no mix meets the budget,
        ``met`` is False in the report, ``dominant`` names the layers that dominate the loss,
        and the model is the mix with the smallest drop.

    Raises:
        ValueError: for a negative budget, a config with ``overrides``, an unknown monitor or
            a config that selects no layer.
    """
    config = resolve_config(config)
    check_max_metric_drop(max_metric_drop)
    if config.overrides:
        raise ValueError(
            "the metric budget chooses per-layer formats itself, so config.overrides must be "
            "empty; keep layers in float with exclude=[...] instead."
        )
    ladder = default_ladder(config) if ladder is None else list(ladder)
    if not ladder:
        raise ValueError("ladder is empty; give at least one wider format, or None for float.")

    search = _Search(
        model,
        config,
        ladder,
        calibration_data,
        eval_data,
        metrics,
        max_batches,
        calibration_batches,
    )
    base_model = search.build({})
    base_report = search.evaluate(base_model)
    monitor = resolve_monitor(monitor, base_report.float_metrics)
    direction = _higher_is_better(metrics, monitor, higher_is_better)
    float_metric = base_report.float_metrics[monitor]
    base_metric = base_report.quantized_metrics[monitor]

    def drop_of(report: ComparisonReport) -> float:
        return _drop(float_metric, report.quantized_metrics[monitor], direction)

    def meets(report: ComparisonReport) -> bool:
        return drop_of(report) <= max_metric_drop + _DROP_TOLERANCE

    best = (drop_of(base_report), base_model, base_report, {})
    ranking: SensitivityReport | None = None
    levels: dict[str, int] = {}
    met = meets(base_report)
    if not met:
        ranking = sensitivity(
            model,
            config,
            calibration_data,
            eval_data,
            metrics=metrics,
            monitor=monitor,
            max_batches=max_batches,
        )
        search.evaluations += len(ranking.layers)
        order = [layer.name for layer in ranking.layers]
        if broadcast is not None:
            order = list(broadcast(order))
        levels = dict.fromkeys(order, 0)
        best, met = _widen(search, order, levels, best, drop_of, meets)
        if met:
            best = _narrow(search, order, best, drop_of, meets)

    drop, chosen, chosen_report, chosen_levels = best
    report = BudgetReport(
        monitor=monitor,
        higher_is_better=direction,
        max_metric_drop=float(max_metric_drop),
        base_format=config.label,
        float_metric=float_metric,
        base_metric=base_metric,
        metric=chosen_report.quantized_metrics[monitor],
        drop=drop,
        met=drop <= max_metric_drop + _DROP_TOLERANCE,
        float_size_bytes=chosen_report.float_size_bytes,
        size_bytes=chosen_report.quantized_size_bytes,
        evaluations=search.evaluations,
        moved=_moves(chosen, chosen_levels, ladder, ranking, monitor),
        dominant=_dominant(ranking, monitor, direction),
        sensitivity=ranking,
    )
    _log_outcome(report)
    state = get_state(chosen)
    if state is not None:
        state.budget = report
    return chosen, report


def _widen(
    search: _Search,
    order: list[str],
    levels: dict[str, int],
    best: tuple,
    drop_of: Any,
    meets: Any,
) -> tuple[tuple, bool]:
    """Move layers up the ladder, most sensitive first, until a mix meets the budget."""
    for level in range(1, len(search.ladder) + 1):
        for name in order:
            if levels[name] >= level:
                continue
            levels[name] = level
            candidate = search.build(levels)
            report = search.evaluate(candidate)
            if drop_of(report) < best[0]:
                best = (drop_of(report), candidate, report, dict(levels))
            if meets(report):
                return (drop_of(report), candidate, report, dict(levels)), True
    return best, False


def _narrow(search: _Search, order: list[str], best: tuple, drop_of: Any, meets: Any) -> tuple:
    """Move each widened layer back down, least sensitive first, while the budget still holds."""
    levels = dict(best[3])
    for name in reversed(order):
        while levels[name] > 0:
            trial = {**levels, name: levels[name] - 1}
            candidate = search.build(trial)
            report = search.evaluate(candidate)
            if not meets(report):
                break
            levels = trial
            best = (drop_of(report), candidate, report, dict(levels))
    return best


def _moves(
    model: nn.Module,
    levels: Mapping[str, int],
    ladder: Sequence[Step],
    ranking: SensitivityReport | None,
    monitor: str,
) -> list[LayerMove]:
    alone = {}
    if ranking is not None:
        alone = {layer.name: layer.metric_change.get(monitor, math.nan) for layer in ranking.layers}
    state = get_state(model)
    formats = {}
    if state is not None and state.report is not None:
        formats = {row.name: row.format or "float" for row in state.report.layers}
    moves = []
    for name, level in levels.items():
        if level == 0:
            continue
        to_format = formats.get(name) if ladder[level - 1] is not None else "float"
        moves.append(
            LayerMove(
                name=name,
                type_name=type(model.get_submodule(name)).__name__,
                to_format=to_format or "float",
                metric_change_alone=alone.get(name, math.nan),
            )
        )
    return moves


def _dominant(ranking: SensitivityReport | None, monitor: str, higher_is_better: bool) -> list[str]:
    """Return up to three layers whose loss alone is largest, most costly first."""
    if ranking is None:
        return []
    losses = [
        (
            -layer.metric_change.get(monitor, 0.0)
            if higher_is_better
            else layer.metric_change.get(monitor, 0.0),
            layer.name,
        )
        for layer in ranking.layers
    ]
    return [name for loss, name in sorted(losses, reverse=True)[:3] if loss > 0]


def _log_outcome(report: BudgetReport) -> None:
    moved = ", ".join(f"{m.name} -> {m.to_format}" for m in report.moved) or "none"
    if report.met:
        log.info(
            "Metric budget met: %s %.4f -> %.4f (drop %.4f <= %.4f); widened: %s.",
            report.monitor,
            report.float_metric,
            report.metric,
            report.drop,
            report.max_metric_drop,
            moved,
        )
    else:
        warnings.warn(
            f"No mix met the metric budget: the best {report.monitor} drop is "
            f"{report.drop:.4f} > {report.max_metric_drop:.4f}, with {moved} widened; the "
            f"layers that cost the most alone are {report.dominant}. Returning the best model "
            "found; allow float in the ladder, raise max_metric_drop, or exclude those layers.",
            stacklevel=3,
        )


def budget_report(model: nn.Module) -> BudgetReport:
    """Return the report of the metric-budget search that produced ``model``.

    Raises:
        ValueError: when ``model`` did not come from a budgeted quantization.
    """
    state = get_state(model)
    if state is None or state.budget is None:
        raise ValueError(
            f"{type(model).__name__} has no metric-budget report; pass a model returned by "
            "mono_quant.quantize(..., max_metric_drop=...) or quantize_with_budget."
        )
    return state.budget
