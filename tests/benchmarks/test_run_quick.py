"""``python -m benchmarks.run --quick``: the report it writes has every row and numeric columns.

Timings are never asserted, because the machine is shared; sizes and errors are, where the
storage format or the bit width fixes their order.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.report import format_number
from benchmarks.run import DEFAULT_OUTPUT, QUICK_OUTPUT, QUICK_PLAN, parse_args
from benchmarks.timing import TimingPolicy, measure, measure_round_robin
from benchmarks.variants import baseline_and_mono_quant_variants

REPO_ROOT = Path(__file__).resolve().parents[2]
LATENCY_NUMERIC = (
    "median ms",
    "speed-up vs fp32 (x)",
    "speed-up vs best peer (x)",
    "runs",
    "weight MiB",
    "weight vs fp32",
    "SQNR dB",
)


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Map each ``###`` or ``##`` heading to the rows of the first table below it."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading = None
    headers: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            headers = None
            continue
        if not line.startswith("|") or heading is None:
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if headers is None:
            headers = cells
            tables[heading] = []
        elif not all(set(cell) <= set("-:") for cell in cells):
            tables[heading].append(dict(zip(headers, cells, strict=True)))
    return tables


def parse_number(text: str) -> float | None:
    """Return the float a numeric cell holds, ``None`` for ``-``; raise for anything else."""
    return None if text == "-" else float(text)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(output)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return output.read_text()


@pytest.fixture(scope="module")
def tables(report: str) -> dict[str, list[dict[str, str]]]:
    return parse_tables(report)


def linear_rows(tables: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    (heading,) = [name for name in tables if name.startswith("Linear 768 -> 768")]
    return tables[heading]


def test_report_has_every_section(report: str) -> None:
    for section in ("## Linear layers", "## Whole models", "## Calibration", "## QAT step"):
        assert section in report


def test_report_names_machine(report: str) -> None:
    assert "- CPU: " in report
    assert "- CPU flags: " in report
    assert "- torch " in report


@pytest.mark.parametrize("rows", QUICK_PLAN.linear_rows, ids=lambda rows: f"M{rows}")
def test_linear_rows_every_variant(tables: dict, rows: int) -> None:
    names = {row["variant"] for row in linear_rows(tables) if row["M"] == str(rows)}
    for variant in baseline_and_mono_quant_variants():
        assert variant.name in names


def test_linear_peers_measured_or_footnoted(report: str, tables: dict) -> None:
    names = {row["variant"] for row in linear_rows(tables)}
    assert "torch.ao dynamic int8" in names
    skipped = report.split("## Skipped variants")[-1] if "## Skipped variants" in report else ""
    for peer in ("torchao int8 weight-only", "torchao int8 dynamic-act"):
        assert peer in names or peer in skipped or "torchao (all configs)" in skipped


def test_linear_columns_numeric(tables: dict) -> None:
    for row in linear_rows(tables):
        for column in LATENCY_NUMERIC:
            value = parse_number(row[column])
            assert value is None or not math.isnan(value), (row["variant"], column)


def test_linear_fp32_row_is_reference(tables: dict) -> None:
    for row in linear_rows(tables):
        if row["variant"] == "fp32":
            assert parse_number(row["speed-up vs fp32 (x)"]) == 1.0
            assert parse_number(row["weight vs fp32"]) == 1.0
            assert parse_number(row["SQNR dB"]) == math.inf


def test_linear_weight_bytes_follow_bits(tables: dict) -> None:
    ratios = {
        row["variant"]: parse_number(row["weight vs fp32"])
        for row in linear_rows(tables)
        if row["M"] == "1"
    }
    # Fewer bits per weight, and fewer scales at a larger group_size, store fewer bytes. Each
    # step of this chain differs by far more than the scales and the bias add.
    assert ratios["mono-quant w4 g128"] < ratios["mono-quant w4 g32"]
    assert ratios["mono-quant w4 g32"] < ratios["mono-quant w8"]
    assert ratios["mono-quant w8"] < ratios["mono-quant bf16"]
    assert ratios["mono-quant bf16"] < ratios["fp32"]


def test_linear_int8_weight_bytes_quarter(tables: dict) -> None:
    (row,) = [r for r in linear_rows(tables) if r["variant"] == "mono-quant w8" and r["M"] == "1"]
    # int8 codes are a quarter of float32; one float scale per output row (768 of 589,824
    # weights), the float32 bias and the file overhead add a few percent at this shape.
    ratio = parse_number(row["weight vs fp32"])
    assert ratio >= 0.25
    assert ratio < 0.27


def test_linear_sqnr_follows_bits(tables: dict) -> None:
    sqnr = {
        row["variant"]: parse_number(row["SQNR dB"])
        for row in linear_rows(tables)
        if row["M"] == "64"
    }
    # Each weight bit is worth about 6 dB, so int8 beats int4 by far more than noise.
    assert sqnr["mono-quant w8"] > sqnr["mono-quant w4 g32"] + 12
    assert sqnr["mono-quant fp16"] > sqnr["mono-quant w8"]


@pytest.mark.parametrize("model", ["digits CNN", "digits MLP"])
def test_model_rows_both_batches(tables: dict, model: str) -> None:
    batches = {(row["batch"], row["variant"]) for row in tables[model]}
    for batch in ("1", "64"):
        assert (batch, "fp32") in batches
        assert (batch, "mono-quant w8a8") in batches


@pytest.mark.parametrize("model", ["digits CNN", "digits MLP"])
def test_model_columns_numeric(tables: dict, model: str) -> None:
    for row in tables[model]:
        for column in LATENCY_NUMERIC:
            value = parse_number(row[column])
            assert value is None or not math.isnan(value), (row["variant"], column)


def test_calibration_row_numeric(tables: dict) -> None:
    (row,) = tables["Calibration"]
    assert row["model"] == "digits CNN"
    assert row["observer"] == "minmax"
    for column in ("eval pass ms", "calibrate ms", "calibrate vs eval (x)", "quantize ms"):
        assert math.isfinite(parse_number(row[column]))


def test_qat_float_row_is_reference(tables: dict) -> None:
    rows = {row["case"]: row for row in tables["QAT step"]}
    assert parse_number(rows["float"]["vs float (x)"]) == 1.0
    assert len(rows) >= 2


def test_measure_runs_min_repeats() -> None:
    calls = []
    timing = measure(lambda: calls.append(1), TimingPolicy(budget_s=1e-9, warmup=2, min_repeats=5))
    assert timing.repeats == 5
    assert len(calls) == 7


def test_round_robin_calls_each_once_per_round_in_varying_order() -> None:
    calls: list[str] = []
    names = "abcd"
    policy = TimingPolicy(budget_s=1e-9, warmup=1, min_repeats=12)
    timings = measure_round_robin(
        {name: (lambda name=name: calls.append(name)) for name in names}, policy
    )
    rounds = [calls[start : start + len(names)] for start in range(0, len(calls), len(names))]
    assert len(rounds) == 13
    assert all(sorted(one_round) == list(names) for one_round in rounds)
    # Rotated orders: the timed rounds do not all share one order, and no name always follows
    # the same neighbour.
    assert len({"".join(one_round) for one_round in rounds[1:]}) > 1
    before_a = {
        one_round[one_round.index("a") - 1] for one_round in rounds[1:] if one_round[0] != "a"
    }
    assert len(before_a) > 1
    assert all(timing.repeats == 12 for timing in timings.values())


def test_quick_run_leaves_committed_results_alone() -> None:
    assert parse_args(["--quick"]).output == QUICK_OUTPUT
    assert parse_args([]).output == DEFAULT_OUTPUT
    assert parse_args(["--quick", "--output", "x.md"]).output == Path("x.md")
    assert QUICK_OUTPUT.parent.name == "build"


def test_policy_rejects_zero_budget() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        TimingPolicy(budget_s=0)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (math.inf, "inf"), (1234.5, "1234"), (0.012345, "0.0123"), (1.0, "1.00")],
    ids=["none", "inf", "large", "small", "one"],
)
def test_format_number_cases(value: float | None, text: str) -> None:
    assert format_number(value) == text


@pytest.mark.parametrize(
    "argv",
    [["--sections", "linear,bogus"], ["--threads", "0"], ["--threads", "two"]],
    ids=["section", "zero-threads", "word-threads"],
)
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
