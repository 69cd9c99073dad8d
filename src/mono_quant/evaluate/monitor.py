"""Name the metric a budget or ranking holds, and check the budget value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torchmetrics import Metric, MetricCollection

from mono_quant.evaluate.compare import DEFAULT_ACCURACY_NAME, metric_name


def check_max_metric_drop(value: Any) -> float:
    """Return ``value`` as a float after checking it is a finite number of at least 0.

    Raises:
        TypeError: when ``value`` is not a number.
        ValueError: when it is negative, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"max_metric_drop must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"max_metric_drop={value} must be a finite number of at least 0, in the metric's "
            "units (0.01 is one accuracy point)."
        )
    return float(value)


def resolve_monitor(monitor: str | None, names: Iterable[str]) -> str:
    """Return the computed metric name that ``monitor`` means.

    An exact name wins; otherwise ``monitor`` may be a unique prefix (``"acc"`` for
    ``"accuracy"``). ``None`` picks the first metric.

    Raises:
        ValueError: when no metric was computed or ``monitor`` matches none or several names.
    """
    names = list(names)
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"monitor must be a non-empty metric name, got {monitor!r}.")
    if not names:
        raise ValueError(
            "no task metric was computed, so there is nothing to monitor: pass metrics=... (a "
            "torchmetrics Metric or MetricCollection) and evaluation batches with targets."
        )
    if monitor is None or monitor in names:
        return monitor or names[0]
    candidates = [name for name in names if name.startswith(monitor)]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"monitor={monitor!r} is not one of the computed metrics {names}; pass one of those "
        "names (a unique prefix such as 'acc' for 'accuracy' also works)."
    )


def expected_metric_names(metrics: Metric | MetricCollection | None) -> list[str]:
    """Return the names :func:`mono_quant.compare` will report for ``metrics``.

    ``None`` gives the default accuracy. A metric whose ``compute()`` returns a dict reports
    ``name/key`` figures that only a run reveals, so its plain name is returned.
    """
    if metrics is None:
        return [DEFAULT_ACCURACY_NAME]
    if isinstance(metrics, MetricCollection):
        # keys() carries the collection's prefix and postfix, as compute() does.
        return [str(key) for key in metrics.keys()]  # noqa: SIM118
    return [metric_name(metrics)]
