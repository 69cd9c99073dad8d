"""Decide which layers of a model are quantized, and why the others stay in float."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
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


@dataclass(frozen=True)
class ParameterDecision:
    """Whether one parameter named in ``QuantConfig.parameters`` is stored quantized.

    ``name`` is the qualified parameter name, ``module`` the qualified name of the module that
    owns it, ``attribute`` its attribute name there and ``type_name`` reads like
    ``"Block.proj_weight"``.
    """

    name: str
    module: str
    attribute: str
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
    reason = f"no quantized counterpart for {type(module).__name__}"
    if any(p.is_floating_point() and p.dim() >= 2 for p in module.parameters(recurse=False)):
        reason += "; name its parameters in QuantConfig(parameters=[...]) to store them weight-only"
    return reason


def _inside(name: str, ancestors: Iterable[str]) -> bool:
    """Return True when qualified ``name`` is one of ``ancestors`` or lies inside one."""
    return any(
        ancestor == "" or name == ancestor or name.startswith(ancestor + ".")
        for ancestor in ancestors
    )


def select_layers(
    model: nn.Module,
    include: tuple[str, ...] | None,
    exclude: tuple[str, ...] | None,
    supported: Collection[type[nn.Module]] | None = None,
) -> list[LayerDecision]:
    """Return a decision for every supported layer and every other layer that owns parameters.

    A supported layer (an exact registry type such as ``nn.Linear``) is quantized unless
    ``include`` is given and none of its patterns matches, or an ``exclude`` pattern matches.
    Submodules of a supported layer (``MultiheadAttention.out_proj``) belong to that layer and
    get no decision of their own.

    ``supported`` narrows the registry types a caller can convert (QAT passes its own types).
    Other registry types then stay float, and their reason names the type.
    """
    decisions = []
    owners: list[str] = []
    for name, module in model.named_modules():
        if _inside(name, owners):
            continue
        type_name = type(module).__name__
        if quantized_counterpart(module) is None:
            if any(True for _ in module.parameters(recurse=False)):
                decisions.append(LayerDecision(name, type_name, False, _float_reason(module)))
            continue
        owners.append(name)

        excluded_by = _first_match(name, module, exclude)
        if supported is not None and type(module) not in supported:
            reason = f"{type_name} is not supported in this mode"
            decisions.append(LayerDecision(name, type_name, False, reason))
        elif excluded_by is not None:
            reason = f"excluded by pattern {excluded_by!r}"
            decisions.append(LayerDecision(name, type_name, False, reason))
        elif include is not None and _first_match(name, module, include) is None:
            reason = f"matches no include pattern {list(include)}"
            decisions.append(LayerDecision(name, type_name, False, reason))
        else:
            decisions.append(LayerDecision(name, type_name, True))
    return decisions


def select_parameters(
    model: nn.Module, patterns: tuple[str, ...] | None, decisions: Iterable[LayerDecision]
) -> list[ParameterDecision]:
    """Return a decision for every parameter that ``patterns`` names, outside quantized layers.

    A parameter is named when one of ``patterns`` globs its qualified name
    (``"block.proj_weight"``). Parameters of layers that ``decisions`` quantize belong to those
    layers and are skipped. A named parameter that is not floating point or has fewer than two
    dimensions stays float with a reason.

    Raises:
        ValueError: when a pattern names no parameter outside the quantized layers.
    """
    if not patterns:
        return []
    quantized_layers = [d.name for d in decisions if d.quantize]
    found: list[ParameterDecision] = []
    used: set[str] = set()
    in_layers: dict[str, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    # remove_duplicate=False lists a parameter under every module that owns it (tied weights),
    # and ``seen`` visits a module reached through two paths once.
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, parameter in module._parameters.items():
            if parameter is None or (id(module), attribute) in seen:
                continue
            seen.add((id(module), attribute))
            name = f"{module_name}.{attribute}" if module_name else attribute
            pattern = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
            if pattern is None:
                continue
            if _inside(module_name, quantized_layers):
                in_layers.setdefault(pattern, []).append(name)
                continue
            used.add(pattern)
            reason = ""
            if not parameter.is_floating_point():
                reason = f"{parameter.dtype} parameters have nothing to quantize"
            elif parameter.dim() < 2:
                reason = (
                    f"{parameter.dim()}-D parameters (biases, norm scales) stay in float; "
                    "weight-only storage needs rows of two or more dimensions"
                )
            type_name = f"{type(module).__name__}.{attribute}"
            found.append(
                ParameterDecision(name, module_name, attribute, type_name, not reason, reason)
            )

    missing = [pattern for pattern in patterns if pattern not in used]
    if missing:
        details = "; ".join(
            f"{p!r} names only parameters of quantized layers ({', '.join(in_layers[p])})"
            if p in in_layers
            else f"{p!r} names no parameter"
            for p in missing
        )
        raise ValueError(
            f"QuantConfig.parameters does not fit {type(model).__name__}: {details}. Name "
            "parameters of modules that stay in float, as printed by model.named_parameters()."
        )
    return found
