"""``convert``: replace the selected layers of a prepared model by quantized layers."""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.core.observers import make_observer
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.attention import disable_fused_transformer_paths
from mono_quant.nn.cast import CAST_DTYPES, CastLayer
from mono_quant.nn.chain import plan_int8_chains
from mono_quant.nn.observed import ObservedLayer
from mono_quant.nn.parametrized import quantize_parameter, share_parameter
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import cast_counterpart, quantized_counterpart
from mono_quant.transform.report import LayerReport, QuantizationReport
from mono_quant.transform.select import LayerDecision, ParameterDecision, select_parameters
from mono_quant.transform.state import QuantizationState, get_state, replace_module, set_state

log = logging.getLogger(__name__)

_SUFFIXES = ("codes", "scale", "zero_point")


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _group_note(weight: torch.Tensor, config: QuantConfig) -> str:
    if config.granularity != "per_group" or config.group_size is None:
        return ""
    row_length = math.prod(weight.shape[1:])
    if row_length % config.group_size == 0:
        return ""
    if row_length < config.group_size:
        return (
            f"rows of {row_length} weights are shorter than group_size {config.group_size}, so "
            "each row is one group"
        )
    return (
        f"rows of {row_length} weights are not a multiple of group_size {config.group_size}; "
        "the last group of each row is shorter"
    )


@dataclass
class _SharedWeights:
    """Storage already built for float tensors that several layers share (tied weights).

    Keys are ``id()`` of the float tensors; each value keeps the tensor alive, so an id cannot
    be reused by another tensor while conversion runs.
    """

    quantized: dict[int, tuple[torch.Tensor, str, QuantizedLayer, str]] = field(
        default_factory=dict
    )
    cast: dict[int, tuple[torch.Tensor, str, nn.Parameter]] = field(default_factory=dict)


def _activation_mode(
    quantized_type: type[QuantizedLayer], config: QuantConfig
) -> tuple[ActivationMode | None, str]:
    """Return the activation mode a layer of ``quantized_type`` gets, and a note when it differs."""
    mode = cast("ActivationMode | None", config.activations)
    type_name = quantized_type.__name__
    if mode == "static" and not quantized_type.supports_static:
        fallback = quantized_type.static_fallback
        if fallback == "dynamic":
            return "dynamic", (
                f"{type_name} cannot use calibrated input ranges, so it quantizes its "
                "activations dynamically"
            )
        mode = None
    if mode == "dynamic" and not quantized_type.supports_dynamic:
        mode = None
    if mode is None and config.activations is not None:
        return None, f"weight-only: {quantized_type.weight_only_reason}"
    return mode, ""


def _observe_weights(
    weights: dict[str, torch.Tensor], spec: QuantSpec, name: str, config: QuantConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    qparams = {}
    for weight_name, weight in weights.items():
        observer = make_observer(config.weight_observer, spec)
        if list(weights) == ["weight"]:
            observer.name = f"the weight of layer '{name}'"
        else:
            observer.name = f"weight '{weight_name}' of layer '{name}'"
        observer(weight.detach())
        qparams[weight_name] = observer.calculate_qparams()
    return qparams


def _share_quantized(
    layer: QuantizedLayer,
    weights: dict[str, torch.Tensor],
    name: str,
    shared: _SharedWeights,
) -> dict[str, str]:
    """Point ``layer``'s buffers at storage built earlier for the same float tensors.

    Return ``{weight name: owner layer name}`` for the weights that now share storage. Storage
    is shared only when the layouts match exactly (same spec, shape and codes), as for an
    embedding tied to an output head.
    """
    tied = {}
    for weight_name, weight in weights.items():
        entry = shared.quantized.get(id(weight))
        if entry is None:
            shared.quantized[id(weight)] = (weight, name, layer, weight_name)
            continue
        _, owner_name, owner, owner_weight = entry
        mine = getattr(layer, f"{weight_name}_codes")
        theirs = getattr(owner, f"{owner_weight}_codes")
        if (
            owner.weight_spec != layer.weight_spec
            or owner.weight_shapes[owner_weight] != layer.weight_shapes[weight_name]
            or mine.shape != theirs.shape
            or not torch.equal(mine, theirs)
            or not torch.equal(
                getattr(layer, f"{weight_name}_scale"), getattr(owner, f"{owner_weight}_scale")
            )
        ):
            continue
        for suffix in _SUFFIXES:
            tensor = getattr(owner, f"{owner_weight}_{suffix}")
            if tensor is not None:
                setattr(layer, f"{weight_name}_{suffix}", tensor)
        tied[weight_name] = owner_name
    return tied


def _share_cast(
    layer: CastLayer, float_module: nn.Module, name: str, shared: _SharedWeights
) -> dict[int, str]:
    """Point ``layer``'s 16-bit parameters at copies made earlier for the same float tensors.

    Return ``{id(float parameter): owner layer name}`` for the parameters now shared.
    """
    tied = {}
    copies = dict(layer.module.named_parameters(remove_duplicate=False))
    for parameter_name, parameter in float_module.named_parameters(remove_duplicate=False):
        entry = shared.cast.get(id(parameter))
        if entry is None:
            shared.cast[id(parameter)] = (parameter, name, copies[parameter_name])
            continue
        owner_module_name, _, attribute = parameter_name.rpartition(".")
        owner = layer.module.get_submodule(owner_module_name)
        setattr(owner, attribute, entry[2])
        tied[id(parameter)] = entry[1]
    return tied


def _tied_note(names: list[str], owners: list[str]) -> str:
    if not names:
        return ""
    owner_list = ", ".join(f"'{owner}'" for owner in dict.fromkeys(owners))
    return f"{', '.join(names)} tied to {owner_list} and stored once there"


def _cast_layer(
    float_module: nn.Module,
    name: str,
    config: QuantConfig,
    report: LayerReport,
    shared: _SharedWeights,
) -> nn.Module:
    layer = cast_counterpart(float_module).from_float(float_module, CAST_DTYPES[config.dtype])
    layer.train(float_module.training)
    tied = _share_cast(layer, float_module, name, shared)
    quantized_type = cast(type[QuantizedLayer], quantized_counterpart(float_module))
    float_weights = quantized_type.float_weights(float_module)
    copies = quantized_type.float_weights(layer.module)
    kept = [weight_name for weight_name, w in float_weights.items() if id(w) not in tied]
    report.format = config.dtype
    report.float_bytes = _tensor_bytes(*(float_weights[n] for n in kept))
    report.quantized_bytes = _tensor_bytes(*(copies[n] for n in kept))
    tied_names = [n for n, w in float_weights.items() if id(w) in tied]
    report.reason = _tied_note(tied_names, [tied[id(float_weights[n])] for n in tied_names])
    return layer


def _quantize_layer(
    module: nn.Module, name: str, config: QuantConfig, shared: _SharedWeights | None = None
) -> tuple[nn.Module, LayerReport]:
    """Return the replacement for one selected layer and its report row."""
    shared = shared if shared is not None else _SharedWeights()
    observer_layer = module if isinstance(module, ObservedLayer) else None
    float_module = observer_layer.module if observer_layer else module
    quantized_type = cast(type[QuantizedLayer], quantized_counterpart(float_module))
    weights = quantized_type.float_weights(float_module)
    report = LayerReport(
        name, type(float_module).__name__, True, float_bytes=_tensor_bytes(*weights.values())
    )

    if not config.is_integer:
        return _cast_layer(float_module, name, config, report, shared), report

    activations, mode_note = _activation_mode(quantized_type, config)
    input_qparams = None
    if activations == "static":
        if observer_layer is None or not observer_layer.input_observer.observed:
            report.quantized = False
            report.reason = "received no input during calibration, so it has no activation range"
            return float_module, report
        input_qparams = observer_layer.input_observer.calculate_qparams()

    weight_spec = quantized_type.layer_spec(config.weight_spec())
    qparams = _observe_weights(weights, weight_spec, name, config)
    # Single-weight layers (Linear, Conv) take one qparams pair, the others a mapping by name.
    weight_qparams: Any = qparams["weight"] if list(qparams) == ["weight"] else qparams
    options: dict[str, Any] = {}
    if activations == "dynamic" and _takes(quantized_type, "activation_granularity"):
        options["activation_granularity"] = config.activation_granularity
    layer: QuantizedLayer = quantized_type.from_float(
        float_module,
        weight_spec,
        activations=activations,
        input_qparams=input_qparams,
        weight_qparams=weight_qparams,
        **options,
    )
    layer.train(float_module.training)
    tied = _share_quantized(layer, weights, name, shared)

    group_notes = dict.fromkeys(_group_note(weight, config) for weight in weights.values())
    notes = [mode_note, *group_notes, _tied_note(list(tied), list(tied.values()))]
    report.format = config.replace(activations=activations).label
    report.reason = "; ".join(note for note in notes if note)
    report.float_bytes = _tensor_bytes(*(w for n, w in weights.items() if n not in tied))
    report.quantized_bytes = sum(
        _tensor_bytes(*(getattr(layer, f"{n}_{suffix}") for suffix in _SUFFIXES))
        for n in layer.weight_names
        if n not in tied
    )
    return layer, report


def _takes(quantized_type: type[QuantizedLayer], argument: str) -> bool:
    """Return True when ``quantized_type.from_float`` accepts ``argument``."""
    return argument in inspect.signature(quantized_type.from_float).parameters


def _float_row(decision: LayerDecision, model: nn.Module) -> LayerReport:
    module = model.get_submodule(decision.name)
    if isinstance(module, ObservedLayer):
        module = module.module
    # A supported layer's submodules (MultiheadAttention.out_proj) have no row of their own.
    recurse = quantized_counterpart(module) is not None
    float_bytes = _tensor_bytes(*module.parameters(recurse=recurse))
    return LayerReport(
        decision.name, decision.type_name, False, reason=decision.reason, float_bytes=float_bytes
    )


def _quantize_parameter(
    model: nn.Module,
    decision: ParameterDecision,
    config: QuantConfig,
    stored: dict[int, tuple[torch.Tensor, str, nn.Module]],
) -> LayerReport:
    """Store one parameter named in ``config.parameters`` quantized; return its report row.

    ``stored`` maps ``id()`` of parameters already stored to their storage, so a parameter
    shared by several modules is stored once.
    """
    module = model.get_submodule(decision.module)
    parameter = getattr(module, decision.attribute)
    report = LayerReport(
        decision.name,
        decision.type_name,
        decision.quantize,
        reason=decision.reason,
        float_bytes=_tensor_bytes(parameter),
    )
    if not decision.quantize:
        return report
    if id(parameter) in stored:
        _, owner, storage = stored[id(parameter)]
        share_parameter(module, decision.attribute, storage)
        report.format = (
            config.dtype if not config.is_integer else config.replace(activations=None).label
        )
        report.float_bytes = 0
        report.reason = f"tied to '{owner}' and stored once there"
        return report
    report = _store_parameter(module, decision, config, report)
    stored[id(parameter)] = (parameter, decision.name, _storage_of(module, decision.attribute))
    return report


def _storage_of(module: nn.Module, attribute: str) -> nn.Module:
    return module.parametrizations[attribute][0]  # type: ignore[index]


def _store_parameter(
    module: nn.Module, decision: ParameterDecision, config: QuantConfig, report: LayerReport
) -> LayerReport:
    parameter = getattr(module, decision.attribute)

    if not config.is_integer:
        storage = quantize_parameter(module, decision.attribute, dtype=CAST_DTYPES[config.dtype])
        report.format = config.dtype
        report.quantized_bytes = _tensor_bytes(storage.weight)
        return report

    spec = config.weight_spec()
    qparams = _observe_weights({"weight": parameter}, spec, decision.name, config)["weight"]
    storage = quantize_parameter(module, decision.attribute, spec, qparams)
    notes = [_group_note(parameter, config)]
    if config.activations is not None:
        notes.insert(0, f"weight-only: {storage.weight_only_reason}")
    report.format = config.replace(activations=None).label
    report.reason = "; ".join(note for note in notes if note)
    report.quantized_bytes = _tensor_bytes(*storage.quantized_tensors())
    return report


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every selected layer replaced by its quantized counterpart.

    Parameters named in ``config.parameters`` are then stored quantized in place (see
    :func:`mono_quant.nn.quantize_parameter`). A float tensor shared by several selected layers
    (an embedding tied to its output head) is quantized once and stored once. Transformer layers
    with fused inference paths are switched to their unfused path, which calls the quantized
    submodules. Plain ``nn.Sequential`` containers with static int8 layers in a row become
    :class:`mono_quant.nn.QuantSequential`, which passes int8 codes between those layers.

    Layers kept in float are listed with the reason in :func:`quantization_report` and logged;
    a selected layer that received no calibration input also raises a warning.

    Raises:
        ValueError: when the model was not prepared or was already converted, or a pattern in
            ``config.parameters`` names no parameter outside the quantized layers.
    """
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not prepared; call mono_quant.prepare(model, config) "
            "first, or use mono_quant.quantize(model, config) for all steps at once."
        )
    if state.report is not None:
        raise ValueError(f"{type(model).__name__} is already converted.")
    parameter_decisions = select_parameters(model, state.config.parameters, state.decisions)
    if not inplace:
        model = copy.deepcopy(model)
        state = cast(QuantizationState, get_state(model))

    report = QuantizationReport(config=state.config.to_dict())
    shared = _SharedWeights()
    rows: list[LayerReport | None] = []
    float_decisions: list[tuple[int, LayerDecision]] = []
    for decision in state.decisions:
        if not decision.quantize:
            float_decisions.append((len(rows), decision))
            rows.append(None)
            continue
        with torch.no_grad():
            layer, row = _quantize_layer(
                model.get_submodule(decision.name),
                decision.name,
                state.config_for(decision.name),
                shared,
            )
        model = replace_module(model, decision.name, layer)
        rows.append(row)

    parameter_rows = []
    stored_parameters: dict[int, tuple[torch.Tensor, str, nn.Module]] = {}
    with torch.no_grad():
        for parameter_decision in parameter_decisions:
            row = _quantize_parameter(model, parameter_decision, state.config, stored_parameters)
            parameter_rows.append(row)
    stored = {d.module for d in parameter_decisions if d.quantize}
    for index, decision in float_decisions:
        row = _float_row(decision, model)
        # A module whose parameters were all stored through config.parameters has no float row.
        if decision.name not in stored or row.float_bytes:
            rows[index] = row
    report.layers.extend(row for row in rows if row is not None)
    report.layers.extend(parameter_rows)

    switched = disable_fused_transformer_paths(model)
    if switched:
        log.info("Switched %s to their unfused path, which calls quantized layers.", switched)
    chained = plan_int8_chains(model)
    if chained:
        log.info("Containers %s pass int8 codes between their static int8 layers.", chained)

    unreached = [row.name for row in report.layers if row.reason.startswith("received no input")]
    if unreached:
        warnings.warn(
            f"layers {unreached} were never called during calibration and stay in float; "
            "calibrate with data that reaches them or exclude them.",
            stacklevel=2,
        )
    for row in report.float_layers:
        log.info("Layer %r (%s) stays in float: %s.", row.name, row.type_name, row.reason)

    state.report = report
    if get_state(model) is not state:
        # The root itself was replaced (the model is a single layer), so carry the state over.
        set_state(model, state)
    return model
