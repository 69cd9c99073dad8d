"""Run the benchmarks and write them as Markdown (``docs/benchmarks.md`` by default).

Run ``python -m benchmarks.run`` (or ``make bench``) from the repository root. ``--quick``
measures a few cells in under a minute, for smoke tests, and writes ``build/benchmarks-quick.md``
so that it leaves the committed results alone. The full run is sized for about ten minutes on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mono_quant as mq
from benchmarks.calibration import OBSERVERS, QATPlan, run_calibration, run_qat
from benchmarks.linear import LinearPlan, run_linear
from benchmarks.model_cases import MODEL_NAMES, ModelCase, build_case, minilm_missing
from benchmarks.models import run_models
from benchmarks.peers import peer_variants, torch_ao_engine, torchao_version
from benchmarks.report import Footnotes, machine_lines
from benchmarks.timing import TimingPolicy
from benchmarks.variants import baseline_and_mono_quant_variants

log = logging.getLogger("benchmarks")

SECTIONS = ("linear", "models", "calibration", "qat")
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
QUICK_OUTPUT = Path(__file__).resolve().parents[1] / "build" / "benchmarks-quick.md"


@dataclass(frozen=True)
class Plan:
    """Everything one run measures."""

    linear_shapes: tuple[tuple[int, int], ...]
    linear_rows: tuple[int, ...]
    models: tuple[str, ...]
    digits_epochs: int
    calibration_models: tuple[str, ...]
    observers: tuple[str, ...]
    qat: QATPlan
    policy: TimingPolicy


FULL_PLAN = Plan(
    linear_shapes=((768, 768), (1024, 4096), (4096, 4096)),
    linear_rows=(1, 8, 64, 512),
    models=MODEL_NAMES,
    digits_epochs=5,
    calibration_models=("digits-cnn", "digits-mlp", "transformer"),
    observers=OBSERVERS,
    qat=QATPlan(size=4096, rows=512, steps=8),
    policy=TimingPolicy(budget_s=0.2, warmup=1, min_repeats=3),
)
QUICK_PLAN = Plan(
    linear_shapes=((768, 768),),
    linear_rows=(1, 64),
    models=("digits-cnn", "digits-mlp"),
    # Untrained digits models keep the quick run short; the full run trains them.
    digits_epochs=0,
    calibration_models=("digits-cnn",),
    observers=("minmax",),
    qat=QATPlan(size=256, rows=64, steps=3),
    policy=TimingPolicy(budget_s=0.02, warmup=1, min_repeats=2),
)


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(
            f"invalid thread counts {text!r}; pass positive integers separated by commas, "
            "such as 1,2."
        )
    return counts


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"invalid sections {text!r}; pass a comma-separated subset of {','.join(SECTIONS)}."
        )
    return names


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}; pass positive seconds.")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure latency, stored weight bytes and output error of mono-quant, "
        "float baselines and other PyTorch quantizers, and write a Markdown report.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="measure a few small cells with a short time budget (under a minute), for tests",
    )
    parser.add_argument(
        "--threads",
        type=_thread_counts,
        default=(1, 2),
        help="torch.set_num_threads values for the Linear tables, comma-separated (default: "
        "1,2). The model, calibration and QAT tables use the first value, and --quick uses "
        "only the first value everywhere.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Markdown file to write (default: docs/benchmarks.md in the repository, or "
        "build/benchmarks-quick.md with --quick)",
    )
    parser.add_argument(
        "--sections",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated sections to run (default: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--budget",
        type=_positive_seconds,
        default=None,
        help="seconds of timed calls per cell after warm-up (default: 0.2, or 0.02 with "
        "--quick); every cell still runs its minimum number of calls",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the selected sections and write the report; return the path written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # mono_quant logs one line per calibration, which would bury the progress lines.
    logging.getLogger("mono_quant").setLevel(logging.WARNING)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.budget is not None:
        plan = replace(plan, policy=replace(plan.policy, budget_s=args.budget))
    threads = args.threads[:1] if args.quick else args.threads

    start = time.perf_counter()
    footnotes = Footnotes()
    body = _run_sections(plan, args.sections, threads, footnotes)
    elapsed = time.perf_counter() - start

    text = _document(plan, args, threads, body, footnotes, elapsed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    log.info("Wrote %s in %.0f s", args.output, elapsed)
    return args.output


def _run_sections(
    plan: Plan, sections: Sequence[str], threads: Sequence[int], footnotes: Footnotes
) -> list[str]:
    variants = baseline_and_mono_quant_variants()
    peers, skipped_peers = peer_variants()
    for skipped in skipped_peers:
        footnotes.add(skipped.name, skipped.reason, "every table")
    variants.extend(peers)

    cases: dict[str, ModelCase] = {}

    def case(name: str) -> ModelCase:
        if name not in cases:
            log.info("Building model case %s", name)
            cases[name] = build_case(name, plan.digits_epochs)
        return cases[name]

    body = []
    # NOTE: on a loaded 2-core machine, 2-thread runs of models made of many small ops were
    # seen to slow down tenfold while a thread waited to be scheduled. The default order
    # "1,2" therefore keeps the model, calibration and QAT tables at one thread.
    first = threads[0]
    if "linear" in sections:
        linear = LinearPlan(plan.linear_shapes, plan.linear_rows, threads)
        body.append(run_linear(linear, variants, plan.policy, footnotes))
    if "models" in sections:
        names = list(plan.models)
        notes = []
        if "minilm" in names and (reason := minilm_missing()) is not None:
            names.remove("minilm")
            notes.append(f"MiniLM skipped: {reason}.")
        not_run = [name for name in MODEL_NAMES if name not in plan.models]
        if not_run:
            notes.append(f"Not run with --quick: {', '.join(not_run)}.")
        model_cases = [case(name) for name in names]
        body.append(run_models(model_cases, notes, first, variants, plan.policy, footnotes))
    if "calibration" in sections:
        calibration_cases = [case(name) for name in plan.calibration_models]
        body.append(
            run_calibration(calibration_cases, plan.observers, first, plan.policy, footnotes)
        )
    if "qat" in sections:
        body.append(run_qat(plan.qat, first, footnotes))
    return body


def _document(
    plan: Plan,
    args: argparse.Namespace,
    threads: Sequence[int],
    body: Sequence[str],
    footnotes: Footnotes,
    elapsed_s: float,
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "--quick" if args.quick else "full"
    policy = plan.policy
    ao = torchao_version()
    try:
        engine = torch_ao_engine()
    except RuntimeError:
        engine = "unavailable"
    command = (
        "`python -m benchmarks.run --quick`"
        if args.quick
        else "`make bench` (`python -m benchmarks.run`)"
    )
    header = [
        "# Benchmarks",
        "",
        f"Generated by {command}; do not edit by hand. "
        f"This file: {mode} run on {now}, {elapsed_s / 60:.1f} minutes, sections "
        f"{', '.join(args.sections)}, Linear threads {', '.join(map(str, threads))}.",
        "",
        *machine_lines(),
        f"- mono_quant {mq.__version__}, torchao {ao or 'not installed'}, torch.ao quantized "
        f"engine {engine}, {platform.system()} {platform.release()}",
        "",
        "NOTE: the machine is shared with other work and its timings are noisy: a ratio within "
        "about 20% of another can swap places between runs. Compare rows of the same table, "
        "which were timed in turns. 2-thread rows suffer most: while another process holds "
        "a core, every parallel region waits for its second thread, so a 2-thread row can be "
        "slower than the same row with 1 thread.",
        "",
        "## Method",
        "",
        "- The variants of one table cell (one M or batch size) take turns: each round calls "
        "every variant once, in a new random order (seeded), so that no variant always runs "
        f"right after the same neighbour. {policy.warmup} untimed warm-up round(s) come "
        f"first, then timed rounds until {policy.budget_s:g} s per variant have passed and "
        f"at least {policy.min_repeats} rounds ran (*runs*). Tables report each variant's "
        "median in milliseconds. Taking turns spreads load from other processes over all variants "
        "alike. Models run in eval mode under `torch.no_grad`.",
        "- Threads are set with `torch.set_num_threads` as each table's heading says.",
        "- *speed-up vs fp32*: the fp32 median over this variant's median, in the same row "
        "group. *speed-up vs best peer*: the fastest peer's median over this variant's "
        "(peers: `torch.ao` `quantize_dynamic` int8 and torchao configs). Above 1 is faster.",
        "- *weight MiB*: bytes of `torch.save(model.state_dict())`, so every quantizer's "
        "packed storage counts the same way; this includes biases, float layers and a few kB "
        "of container overhead. *weight vs fp32*: that size over the fp32 model's.",
        "- *SQNR dB*: `10 log10(sum(ref^2) / sum((ref - out)^2))` of the output against the fp32 "
        "output for the same input (`mono_quant.sqnr_db`); higher is closer, `inf` is exact.",
        "- *bf16*: weights and floating inputs in bfloat16 with PyTorch's own kernels. "
        "*mono-quant w4 g32/g128*: the `w4` preset with `group_size` 32 or 128.",
    ]
    parts = ["\n".join(header), *body]
    notes = footnotes.markdown()
    if notes:
        parts.append("## Skipped variants\n\n" + notes)
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
