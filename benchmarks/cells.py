"""Build every variant of one float model and time them on one input, one after another."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mono_quant as mq
from benchmarks.report import Footnotes, Measurement, error_reason
from benchmarks.timing import TimingPolicy, measure_round_robin, stored_bytes
from benchmarks.variants import Variant, cast_floating

log = logging.getLogger(__name__)


@dataclass
class BuiltVariant:
    """A variant's model, ready to time, with its serialized size."""

    variant: Variant
    model: nn.Module
    weight_bytes: int


def build_variants(
    model: nn.Module,
    variants: Sequence[Variant],
    calibration: Sequence[Any],
    footnotes: Footnotes,
    place: str,
) -> list[BuiltVariant]:
    """Build each variant of ``model``; a variant that raises becomes a footnote at ``place``."""
    built = []
    for variant in variants:
        try:
            quantized = variant.build(model, calibration).eval()
            weight_bytes = stored_bytes(quantized)
        # A peer or a kernel under development may fail in any way. The rest of the run still
        # produces its tables, and the footnote records the error.
        except Exception as error:
            log.warning("%s failed to build on %s: %s", variant.name, place, error)
            footnotes.add(variant.name, error_reason(error), place)
            continue
        built.append(BuiltVariant(variant, quantized, weight_bytes))
    return built


def run_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Return ``model(inputs)`` as float32 without autograd, for error measurements."""
    with torch.no_grad():
        output = model(inputs)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{type(model).__name__} returned {type(output).__name__}; the benchmarks compare "
            "outputs that are a single tensor."
        )
    return output.float()


def errors_db(
    built: Sequence[BuiltVariant],
    inputs: Any,
    reference: torch.Tensor,
    footnotes: Footnotes,
    place: str,
) -> dict[str, float]:
    """Return each variant's output SQNR against ``reference``; failures become footnotes."""
    errors = {}
    for item in built:
        try:
            output = run_model(item.model, cast_floating(inputs, item.variant.input_dtype))
        # Same reason as in build_variants: one failing variant must not end the run.
        except Exception as error:
            log.warning("%s failed on %s: %s", item.variant.name, place, error)
            footnotes.add(item.variant.name, error_reason(error), place)
            continue
        errors[item.variant.name] = mq.sqnr_db(reference, output)
    return errors


def time_cell(
    built: Sequence[BuiltVariant],
    inputs: Any,
    errors: dict[str, float],
    policy: TimingPolicy,
) -> list[Measurement]:
    """Time every variant that has an error figure on ``inputs``, taking turns.

    Variants without an error figure failed on these inputs and are left out.
    """
    runnable = [item for item in built if item.variant.name in errors]
    calls = {}
    for item in runnable:
        cast_inputs = cast_floating(inputs, item.variant.input_dtype)

        def call(model: nn.Module = item.model, cast_inputs: Any = cast_inputs) -> None:
            model(cast_inputs)

        calls[item.variant.name] = call

    with torch.no_grad():
        timings = measure_round_robin(calls, policy)
    return [
        Measurement(
            variant=item.variant.name,
            group=item.variant.group,
            timing=timings[item.variant.name],
            weight_bytes=item.weight_bytes,
            sqnr_db=errors[item.variant.name],
        )
        for item in runnable
    ]
