"""The model variants every benchmark row compares: float baselines and mono-quant presets.

Each :class:`Variant` turns a float model into the model to time. Peers (other quantizers) are
built in :mod:`benchmarks.peers` with the same interface.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mono_quant as mq

BASELINE = "baseline"
MONO_QUANT = "mono-quant"
PEER = "peer"
FP32 = "fp32"

# Builds the model to time from the float model and a list of calibration batches.
Builder = Callable[[nn.Module, Sequence[Any]], nn.Module]


@dataclass(frozen=True)
class Variant:
    """One way to run a model: a name for the tables, its group and how to build it.

    Attributes:
        name: row label, unique within a run.
        group: ``"baseline"``, ``"mono-quant"`` or ``"peer"``; only peers count for the
            "speed-up vs best peer" column.
        build: returns the model to time; it must not change the float model it is given.
        input_dtype: floating inputs are cast to this dtype before each call (``None`` keeps
            float32). Outputs are cast to float32 before they are compared.
    """

    name: str
    group: str
    build: Builder
    input_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class SkippedVariant:
    """A variant that cannot run in this environment, with the reason for the footnote."""

    name: str
    reason: str


def cast_floating(inputs: Any, dtype: torch.dtype | None) -> Any:
    """Return ``inputs`` with every floating-point tensor cast to ``dtype`` (nested too).

    Integer tensors such as token ids and attention masks keep their dtype.
    """
    if dtype is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {key: cast_floating(value, dtype) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(cast_floating(value, dtype) for value in inputs)
    return inputs


def _float32(model: nn.Module, calibration: Sequence[Any]) -> nn.Module:
    return model


def _bfloat16(model: nn.Module, calibration: Sequence[Any]) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def _mono_quant(preset: str, **overrides: Any) -> Builder:
    config = mq.QuantConfig.from_preset(preset, **overrides)

    def build(model: nn.Module, calibration: Sequence[Any]) -> nn.Module:
        data = list(calibration) if config.needs_calibration else None
        return mq.quantize(model, config, calibration_data=data)

    return build


def _preset_variants() -> list[Variant]:
    """Return one variant per preset in ``mono_quant.PRESETS``, and w4 at group_size 128 too."""
    variants = []
    for preset in mq.PRESETS:
        if preset == "w4":
            for group_size in (32, 128):
                variants.append(
                    Variant(
                        f"mono-quant w4 g{group_size}",
                        MONO_QUANT,
                        _mono_quant(preset, group_size=group_size),
                    )
                )
        else:
            variants.append(Variant(f"mono-quant {preset}", MONO_QUANT, _mono_quant(preset)))
    return variants


def baseline_and_mono_quant_variants() -> list[Variant]:
    """Return fp32, bf16 (weights and inputs) and every mono-quant preset, in table order."""
    return [
        Variant(FP32, BASELINE, _float32),
        Variant("bf16", BASELINE, _bfloat16, input_dtype=torch.bfloat16),
        *_preset_variants(),
    ]
