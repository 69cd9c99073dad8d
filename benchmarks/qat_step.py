"""Time one QAT training step of a square ``nn.Linear`` against the same step in float.

A step is forward, backward and an SGD step. ``zero_grad`` sets gradients to ``None``, the
default of ``torch.optim`` that Lightning uses. The cases run round-robin, one step each per
round, so that load from other processes on the machine hits every case alike, and the median
of the rounds is reported.

Run ``PYTHONPATH=src python benchmarks/qat_step.py`` for a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mono_quant.transform.qat import prepare_qat

# Case name -> (preset, learnable_scale); ``None`` is the float baseline.
CASES: dict[str, tuple[str | None, bool | None]] = {
    "float": (None, None),
    "w8": ("w8", False),
    "w8a8": ("w8a8", False),
    "w4 LSQ": ("w4", True),
}


def _make_step(
    size: int, rows: int, preset: str | None, learnable: bool | None, seed: int
) -> Callable[[], None]:
    torch.manual_seed(seed)
    model: nn.Module = nn.Linear(size, size)
    if preset is not None:
        model = prepare_qat(model, preset, learnable_scale=learnable)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs = torch.randn(rows, size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs).square().mean()
        loss.backward()
        optimizer.step()

    return step


def measure_qat_step(
    size: int = 4096,
    rows: int = 512,
    threads: int = 2,
    steps: int = 10,
    warmup: int = 2,
    cases: tuple[str, ...] = tuple(CASES),
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Measure the median step time of each case, as ``{case: {"ms": .., "ratio": ..}}``.

    ``ratio`` is the median divided by the float median, and is present only when ``"float"``
    is among ``cases``. ``threads`` sets ``torch.set_num_threads`` for the run and is restored
    afterwards.
    """
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {list(CASES)}.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step_functions = {case: _make_step(size, rows, *CASES[case], seed) for case in cases}
        for step in step_functions.values():
            for _ in range(warmup):
                step()

        timings: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(steps):
            for case, step in step_functions.items():
                start = time.perf_counter()
                step()
                timings[case].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous_threads)

    results = {case: {"ms": statistics.median(values)} for case, values in timings.items()}
    if "float" in results:
        baseline = results["float"]["ms"]
        for row in results.values():
            row["ratio"] = row["ms"] / baseline
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="in and out features")
    parser.add_argument("--rows", type=int, default=512, help="input rows per step")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    args = parser.parse_args()

    results = measure_qat_step(args.size, args.rows, args.threads, args.steps)
    print(f"Linear {args.size}x{args.size}, {args.rows} rows, {args.threads} threads, float32")
    print(f"{'case':<8} {'median ms':>10} {'x float':>8}")
    for case, row in results.items():
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        print(f"{case:<8} {row['ms']:>10.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
