"""Whole models at batch 1 and 64: every variant's latency, size and output error."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from benchmarks.cells import build_variants, errors_db, run_model, time_cell
from benchmarks.model_cases import ModelCase
from benchmarks.report import LATENCY_COLUMNS, Footnotes, latency_rows, markdown_table
from benchmarks.timing import TimingPolicy, num_threads
from benchmarks.variants import Variant

log = logging.getLogger(__name__)


def run_models(
    cases: Sequence[ModelCase],
    notes: Sequence[str],
    threads: int,
    variants: Sequence[Variant],
    policy: TimingPolicy,
    footnotes: Footnotes,
) -> str:
    """Measure every variant of each model case and return the section as Markdown.

    ``notes`` are sentences for the end of the section, such as models skipped in this run.
    """
    parts = [
        "## Whole models",
        "",
        f"{threads} thread(s). SQNR compares each model output (logits, or MiniLM's sentence "
        "embeddings) with the fp32 output for the same batch. The peers quantize only "
        "`nn.Linear` layers, so convolutions stay in float32 for them. mono-quant's static "
        "preset `w8a8` calibrates on the batches named under each model.",
    ]
    with num_threads(threads):
        for case in cases:
            parts.extend(_measure_case(case, variants, policy, footnotes))
    if notes:
        parts.extend(["", *notes])
    return "\n".join(parts)


def _measure_case(
    case: ModelCase, variants: Sequence[Variant], policy: TimingPolicy, footnotes: Footnotes
) -> list[str]:
    log.info("Model %s: building variants", case.name)
    built = build_variants(case.model, variants, case.calibration, footnotes, case.name)
    table_rows = []
    for batch, inputs in case.inputs.items():
        place = f"{case.name} batch {batch}"
        reference = run_model(case.model, inputs)
        errors = errors_db(built, inputs, reference, footnotes, place)
        log.info("Model %s, batch %d", case.name, batch)
        cell = time_cell(built, inputs, errors, policy)
        table_rows.extend(latency_rows(cell, leading=[str(batch)]))
    return [
        "",
        f"### {case.name}",
        "",
        f"{case.description[0].upper()}{case.description[1:]}; calibration: "
        f"{len(case.calibration)} batches.",
        "",
        markdown_table(("batch", "variant", *LATENCY_COLUMNS), table_rows),
    ]
