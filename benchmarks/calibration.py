"""Up-front costs of quantizing: calibration vs an eval pass, and QAT steps vs float steps."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mono_quant as mq
from benchmarks.model_cases import ModelCase
from benchmarks.report import Footnotes, error_reason, format_number, markdown_table
from benchmarks.timing import TimingPolicy, measure, num_threads
from mono_quant.transform.qat import prepare_qat

log = logging.getLogger(__name__)

# The observers QuantConfig documents for static activations.
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")


@dataclass(frozen=True)
class QATPlan:
    """Size of the QAT step measurement: one square Linear, ``rows`` input rows per step."""

    size: int
    rows: int
    steps: int


def run_calibration(
    cases: Sequence[ModelCase],
    observers: Sequence[str],
    threads: int,
    policy: TimingPolicy,
    footnotes: Footnotes,
) -> str:
    """Time calibration and full quantization against an eval pass over the same batches."""
    rows = []
    with num_threads(threads):
        for case in cases:
            log.info("Calibration: %s", case.name)
            rows.extend(_calibration_rows(case, observers, policy, footnotes))
    headers = (
        "model",
        "observer",
        "batches",
        "eval pass ms",
        "calibrate ms",
        "calibrate vs eval (x)",
        "quantize ms",
        "quantize vs eval (x)",
    )
    return "\n".join(
        [
            "## Calibration",
            "",
            f"{threads} thread(s), preset `w8a8` (static int8 activations) with each activation "
            "observer. *eval pass*: the float model in eval mode under `torch.no_grad` over the "
            "calibration batches. *calibrate*: `mono_quant.calibrate` on a prepared model over "
            "the same batches. *quantize*: `mono_quant.quantize`, which deep-copies the model, "
            "prepares, calibrates and converts it. The eval pass is timed like a table cell "
            "above. Calibrate and quantize have no warm-up call and stop after the first "
            "call that ends past the time budget, because they are one-off costs.",
            "",
            markdown_table(headers, rows),
        ]
    )


def _calibration_rows(
    case: ModelCase, observers: Sequence[str], policy: TimingPolicy, footnotes: Footnotes
) -> list[list[str]]:
    batches = case.calibration
    model = case.model

    def eval_pass() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch["input"] if isinstance(batch, dict) else batch)

    eval_ms = measure(eval_pass, policy).median_ms
    # Calibration is a one-off cost and the mse observer takes seconds per pass, so these
    # cells skip warm-up and stop after one call once the budget is spent.
    one_off = TimingPolicy(budget_s=policy.budget_s, warmup=0, min_repeats=1)
    rows = []
    for observer in observers:
        config = mq.QuantConfig.from_preset("w8a8", observer=observer)
        try:
            prepared = mq.prepare(model, config)
            calibrate_ms = measure(lambda p=prepared: mq.calibrate(p, batches), one_off).median_ms
            quantize_ms = measure(
                lambda c=config: mq.quantize(model, c, calibration_data=batches), one_off
            ).median_ms
        # A failing observer leaves a footnote; the other observers still run.
        except Exception as error:
            footnotes.add(f"observer {observer}", error_reason(error), f"calibration, {case.name}")
            continue
        rows.append(
            [
                case.name,
                observer,
                str(len(batches)),
                format_number(eval_ms),
                format_number(calibrate_ms),
                format_number(calibrate_ms / eval_ms),
                format_number(quantize_ms),
                format_number(quantize_ms / eval_ms),
            ]
        )
    return rows


def run_qat(plan: QATPlan, threads: int, footnotes: Footnotes) -> str:
    """Time QAT training steps of one Linear against a float step and return the section."""
    source, results = _qat_results(plan, threads, footnotes)
    headers = ("case", "median step ms", "vs float (x)")
    rows = [
        [case, format_number(values.get("ms")), format_number(values.get("ratio"))]
        for case, values in results.items()
    ]
    return "\n".join(
        [
            "## QAT step",
            "",
            f"One `nn.Linear({plan.size}, {plan.size})` in float32, {plan.rows} input rows, "
            f"{threads} thread(s). A step is forward, backward and an SGD step; fake-quantized "
            "layers come from `mono_quant.transform.qat.prepare_qat`. The median is over "
            f"{plan.steps} steps per case. Measured by {source}.",
            "",
            markdown_table(headers, rows),
        ]
    )


def _qat_results(
    plan: QATPlan, threads: int, footnotes: Footnotes
) -> tuple[str, dict[str, dict[str, float]]]:
    """Return the measuring code's name and ``{case: {"ms": .., "ratio": ..}}``.

    Uses ``benchmarks.qat_step.measure_qat_step`` when that module exists, else the simpler
    measurement in this file.
    """
    try:
        from benchmarks.qat_step import measure_qat_step
    except ImportError as error:
        log.info("benchmarks.qat_step not importable (%s); timing QAT steps here", error)
    else:
        try:
            results = measure_qat_step(
                size=plan.size, rows=plan.rows, threads=threads, steps=plan.steps
            )
        # An interface change in that module must not end the run, so fall back and add a footnote.
        except Exception as error:
            footnotes.add("benchmarks.qat_step", error_reason(error), "QAT step")
        else:
            return "`benchmarks.qat_step.measure_qat_step`", results
    return "`benchmarks.calibration`", _measure_qat_here(plan, threads)


def _qat_step(size: int, rows: int, preset: str | None) -> Callable[[], None]:
    torch.manual_seed(0)
    model: nn.Module = nn.Linear(size, size)
    if preset is not None:
        model = prepare_qat(model, preset)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs = torch.randn(rows, size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        optimizer.step()

    return step


def _measure_qat_here(plan: QATPlan, threads: int) -> dict[str, dict[str, float]]:
    """Time a float step and w8, w8a8 and w4 QAT steps (w4 learns its scales by default)."""
    policy = TimingPolicy(budget_s=1e-3, warmup=2, min_repeats=plan.steps, max_repeats=plan.steps)
    results: dict[str, dict[str, Any]] = {}
    with num_threads(threads):
        for case, preset in (("float", None), ("w8", "w8"), ("w8a8", "w8a8"), ("w4", "w4")):
            step = _qat_step(plan.size, plan.rows, preset)
            results[case] = {"ms": measure(step, policy).median_ms}
    for values in results.values():
        values["ratio"] = values["ms"] / results["float"]["ms"]
    return results
