"""Format benchmark results as Markdown: number formats, tables, footnotes and the machine."""

from __future__ import annotations

import math
import os
import platform
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.timing import Timing
from benchmarks.variants import FP32, PEER

MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[1]
# CPU flags that decide which int8, bf16 and fp16 kernels a CPU can use, in display order.
NOTABLE_CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
LATENCY_COLUMNS = (
    "median ms",
    "speed-up vs fp32 (x)",
    "speed-up vs best peer (x)",
    "runs",
    "weight MiB",
    "weight vs fp32",
    "SQNR dB",
)


def format_number(value: float | None, digits: int = 3) -> str:
    """Format ``value`` with at least ``digits`` significant digits and no exponent.

    ``None`` becomes ``-``; infinities become ``inf``/``-inf`` and NaN ``nan``, all of which
    ``float()`` parses back.
    """
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return a GitHub Markdown table; text columns align left and numeric ones right."""
    numeric = [
        bool(rows) and all(_is_number(row[index]) for row in rows) for index in range(len(headers))
    ]
    align = ["---:" if is_numeric else "---" for is_numeric in numeric]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    if text == "-":
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class Measurement:
    """One timed variant in one cell (a layer shape, batch and thread count, or a model)."""

    variant: str
    group: str
    timing: Timing
    weight_bytes: int
    sqnr_db: float


def latency_rows(cell: Sequence[Measurement], leading: Sequence[str] = ()) -> list[list[str]]:
    """Return one table row per measurement of ``cell`` with its ratios to fp32 and best peer.

    ``leading`` cells (such as the batch size) start every row. The best peer is the fastest
    peer measured in the same cell, so rows of a cell without peers show ``-``.
    """
    fp32 = next((m for m in cell if m.variant == FP32), None)
    peers = [m.timing.median_s for m in cell if m.group == PEER]
    best_peer = min(peers) if peers else None
    rows = []
    for measurement in cell:
        median = measurement.timing.median_s
        # Speed-ups, so that "at least 2x faster than fp32" reads as a value of 2 or more.
        vs_fp32 = fp32.timing.median_s / median if fp32 else None
        vs_peer = best_peer / median if best_peer else None
        bytes_ratio = measurement.weight_bytes / fp32.weight_bytes if fp32 else None
        rows.append(
            [
                *leading,
                measurement.variant,
                format_number(measurement.timing.median_ms),
                format_number(vs_fp32),
                format_number(vs_peer),
                str(measurement.timing.repeats),
                format_number(measurement.weight_bytes / MIB),
                format_number(bytes_ratio),
                format_number(measurement.sqnr_db),
            ]
        )
    return rows


@dataclass
class Footnotes:
    """Reasons why a variant was skipped, each listed once with the places it applies to."""

    places: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, variant: str, reason: str, place: str) -> None:
        """Record that ``variant`` was skipped at ``place`` because of ``reason``."""
        places = self.places.setdefault((variant, reason), [])
        if place not in places:
            places.append(place)

    def markdown(self) -> str:
        """Return the footnotes as a Markdown list, or an empty string when there are none."""
        lines = []
        for (variant, reason), places in self.places.items():
            where = ", ".join(places)
            lines.append(f"- {variant} skipped ({where}): {reason}")
        return "\n".join(lines)


def error_reason(error: BaseException) -> str:
    """Return the type and first line of ``error`` and where it was raised, for a footnote."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        # The innermost frame names the library code that rejected the model, which the
        # message alone often does not.
        text += f" (raised in {_short_path(frames[-1].filename)}:{frames[-1].lineno})"
    return text


def _short_path(filename: str) -> str:
    """Return ``filename`` relative to the repository or to site-packages, where it is in one."""
    path = Path(filename)
    if "site-packages" in path.parts:
        return path.as_posix().split("site-packages/")[-1]
    if path.is_relative_to(REPO_ROOT):
        return path.relative_to(REPO_ROOT).as_posix()
    return path.as_posix()


def cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, or ``platform.processor()`` elsewhere."""
    text = _read_cpuinfo()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if match:
        return match.group(1).strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Return the flags from :data:`NOTABLE_CPU_FLAGS` that ``/proc/cpuinfo`` lists."""
    match = re.search(r"^flags\s*:\s*(.+)$", _read_cpuinfo(), re.MULTILINE)
    if not match:
        return []
    flags = set(match.group(1).split())
    return [flag for flag in NOTABLE_CPU_FLAGS if flag in flags]


def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    try:
        return path.read_text()
    except OSError:
        return ""


def machine_lines() -> list[str]:
    """Return Markdown list lines that describe the CPU, the core count and the torch build."""
    flags = ", ".join(cpu_flags()) or "not available (no /proc/cpuinfo)"
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible to this process",
        f"- CPU flags: {flags}",
        f"- torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}",
    ]
