"""Single ``nn.Linear`` layers: every variant at several shapes, batch rows and thread counts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.cells import build_variants, errors_db, run_model, time_cell
from benchmarks.report import LATENCY_COLUMNS, Footnotes, latency_rows, markdown_table
from benchmarks.timing import TimingPolicy, num_threads
from benchmarks.variants import Variant

log = logging.getLogger(__name__)

# Batches of random rows that static activation presets calibrate on.
CALIBRATION_BATCHES = 4
CALIBRATION_ROWS = 64


@dataclass(frozen=True)
class LinearPlan:
    """Cells of the Linear section.

    Attributes:
        shapes: ``(in_features, out_features)`` pairs.
        rows: batch rows M of the ``(M, in_features)`` input.
        threads: ``torch.set_num_threads`` values, one table each.
    """

    shapes: Sequence[tuple[int, int]]
    rows: Sequence[int]
    threads: Sequence[int]


def run_linear(
    plan: LinearPlan, variants: Sequence[Variant], policy: TimingPolicy, footnotes: Footnotes
) -> str:
    """Measure every variant of each Linear shape and return the section as Markdown."""
    parts = [
        "## Linear layers",
        "",
        "One `nn.Linear` (with bias) with PyTorch's default initialisation, inputs drawn from a "
        "standard normal, seed 0. The static-activation preset `w8a8` calibrates on "
        f"{CALIBRATION_BATCHES} batches of {CALIBRATION_ROWS} such rows. M is the number of "
        "input rows. SQNR compares each output with the fp32 output of the same input.",
    ]
    for in_features, out_features in plan.shapes:
        tables = _measure_shape(in_features, out_features, plan, variants, policy, footnotes)
        parts.extend(tables)
    return "\n".join(parts)


def _measure_shape(
    in_features: int,
    out_features: int,
    plan: LinearPlan,
    variants: Sequence[Variant],
    policy: TimingPolicy,
    footnotes: Footnotes,
) -> list[str]:
    shape = f"{in_features}x{out_features}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).eval()
    calibration = [torch.randn(CALIBRATION_ROWS, in_features) for _ in range(CALIBRATION_BATCHES)]
    with num_threads(max(plan.threads)):
        built = build_variants(model, variants, calibration, footnotes, f"Linear {shape}")

    inputs = {rows: torch.randn(rows, in_features) for rows in plan.rows}
    errors = {}
    for rows, batch in inputs.items():
        place = f"Linear {shape} M={rows}"
        errors[rows] = errors_db(built, batch, run_model(model, batch), footnotes, place)

    tables = []
    for threads in plan.threads:
        table_rows = []
        with num_threads(threads):
            for rows, batch in inputs.items():
                log.info("Linear %s, M=%d, %d thread(s)", shape, rows, threads)
                cell = time_cell(built, batch, errors[rows], policy)
                table_rows.extend(latency_rows(cell, leading=[str(rows)]))
        tables.extend(
            [
                "",
                f"### Linear {in_features} -> {out_features}, {threads} thread(s)",
                "",
                markdown_table(("M", "variant", *LATENCY_COLUMNS), table_rows),
            ]
        )
    return tables
