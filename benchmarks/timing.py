"""Time callables with warm-up and a per-cell time budget, and count stored bytes."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one cell.

    Attributes:
        budget_s: timed calls continue until this many seconds have passed (after warm-up) and
            at least ``min_repeats`` calls have run.
        warmup: untimed calls before timing, so one-off costs (allocation, weight packing,
            lazy caches) stay out of the median.
        min_repeats: timed calls per cell, however slow each one is.
        max_repeats: upper bound on timed calls, so a very fast cell ends early.
    """

    budget_s: float = 0.25
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 200

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError(f"budget_s={self.budget_s} must be a positive number of seconds.")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be 0 or more calls.")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(
                f"min_repeats={self.min_repeats} and max_repeats={self.max_repeats} must satisfy "
                "1 <= min_repeats <= max_repeats."
            )


@dataclass(frozen=True)
class Timing:
    """The median wall-clock time of one cell and how many timed calls it came from."""

    median_s: float
    repeats: int

    @property
    def median_ms(self) -> float:
        """Median time in milliseconds."""
        return self.median_s * 1e3


def measure(fn: Callable[[], Any], policy: TimingPolicy) -> Timing:
    """Call ``fn`` ``policy.warmup`` times, then time calls until the budget is spent.

    Returns the median of the timed calls, which resists the outliers that other processes on
    a shared machine cause better than the mean does.
    """
    for _ in range(policy.warmup):
        fn()

    times: list[float] = []
    start = time.perf_counter()
    while len(times) < policy.max_repeats:
        call_start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - call_start)
        enough_calls = len(times) >= policy.min_repeats
        if enough_calls and time.perf_counter() - start >= policy.budget_s:
            break
    return Timing(median_s=statistics.median(times), repeats=len(times))


def measure_round_robin(
    functions: Mapping[str, Callable[[], Any]], policy: TimingPolicy
) -> dict[str, Timing]:
    """Time several callables in turns, one call each per round, and return their medians.

    ``policy.warmup`` untimed rounds come first. Timed rounds continue until
    ``policy.budget_s`` seconds per callable have passed and at least ``policy.min_repeats``
    rounds ran. Taking turns spreads the load of other processes on a shared machine over all
    callables alike, so their ratios stay fair even when the absolute times drift.

    Each round calls the callables in a new random order (seeded, so runs repeat). A fixed
    order made one variant always follow the same neighbour, and the neighbour changes the time:
    a 4096x4096 int8 layer at one row took 0.5 to 0.6 ms right after a float32 layer, whose
    64 MiB weight evicts the CPU cache, and 0.4 ms after another int8 layer (2 threads, AMD
    EPYC, torch 2.13).
    """
    for _ in range(policy.warmup):
        for function in functions.values():
            function()

    times: dict[str, list[float]] = {name: [] for name in functions}
    budget_s = policy.budget_s * len(functions)
    order = list(functions)
    shuffle = random.Random(0).shuffle
    start = time.perf_counter()
    for round_index in range(policy.max_repeats):
        shuffle(order)
        for name in order:
            function = functions[name]
            call_start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - call_start)
        enough_rounds = round_index + 1 >= policy.min_repeats
        if enough_rounds and time.perf_counter() - start >= budget_s:
            break
    return {
        name: Timing(median_s=statistics.median(values), repeats=len(values))
        for name, values in times.items()
    }


@contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)`` and restore the old count after."""
    if count < 1:
        raise ValueError(f"thread count {count} must be at least 1.")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ByteCounter:
    """A write-only file object that counts bytes and keeps none of them."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def stored_bytes(model: nn.Module) -> int:
    """Return the size of ``torch.save(model.state_dict())`` in bytes, without writing a file.

    Serializing counts every quantizer's storage the same way: packed parameters of
    ``torch.ao`` dynamic layers and torchao tensor subclasses are not ordinary parameters or
    buffers, so summing ``numel * element_size`` over those would miss or misstate them.
    NOTE: the count includes the zip container and pickle overhead (a few kB per file), which
    matters only for very small models.
    """
    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.count
