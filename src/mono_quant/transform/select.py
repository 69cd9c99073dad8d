"""Decide which layers of a model are quantized, and why the others stay in float."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from mono_quant.nn.registry import QUANTIZED_MODULES, quantized_counterpart

_NORMALIZATION_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class LayerDecision:
    """Whether one layer is quantized; ``reason`` explains a layer kept in float."""

    name: str
    type_name: str
    quantize: bool
    reason: str = ""


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """Return True when ``pattern`` globs ``name`` or equals the module's class name."""
    return fnmatch.fnmatchcase(name, pattern) or type(module).__name__ == pattern


def _first_match(name: str, module: nn.Module, patterns: tuple[str, ...] | None) -> str | None:
    return next((p for p in patterns or () if matches(name, module, p)), None)


def _float_reason(module: nn.Module) -> str:
    if isinstance(module, _NORMALIZATION_TYPES):
        return "normalization layers stay in float"
    base = next((t for t in QUANTIZED_MODULES if isinstance(module, t)), None)
    if base is not None:
        return (
            f"{type(module).__name__} subclasses {base.__name__}; subclasses stay in float "
            "because their parent may read the weight directly"
        )
    return f"no quantized counterpart for {type(module).__name__}"


def select_layers(
    model: nn.Module, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None
) -> list[LayerDecision]:
    """Return a decision for every supported layer and every other layer that owns parameters.

    A supported layer (an exact registry type such as ``nn.Linear``) is quantized unless
    ``include`` is given and none of its patterns matches, or an ``exclude`` pattern matches.
    """
    decisions = []
    for name, module in model.named_modules():
        type_name = type(module).__name__
        if quantized_counterpart(module) is None:
            if any(True for _ in module.parameters(recurse=False)):
                decisions.append(LayerDecision(name, type_name, False, _float_reason(module)))
            continue

        excluded_by = _first_match(name, module, exclude)
        if excluded_by is not None:
            reason = f"excluded by pattern {excluded_by!r}"
            decisions.append(LayerDecision(name, type_name, False, reason))
        elif include is not None and _first_match(name, module, include) is None:
            reason = f"matches no include pattern {list(include)}"
            decisions.append(LayerDecision(name, type_name, False, reason))
        else:
            decisions.append(LayerDecision(name, type_name, True))
    return decisions
