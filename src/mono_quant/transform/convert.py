"""``convert``: replace the selected layers of a prepared model by quantized layers."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import cast

import torch
from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.core.observers import make_observer
from mono_quant.nn.cast import CAST_DTYPES, CastLayer
from mono_quant.nn.observed import ObservedLayer
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import quantized_counterpart
from mono_quant.transform.report import LayerReport, QuantizationReport
from mono_quant.transform.select import LayerDecision
from mono_quant.transform.state import QuantizationState, get_state, replace_module, set_state

log = logging.getLogger(__name__)


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


def _quantize_layer(
    module: nn.Module, name: str, config: QuantConfig
) -> tuple[nn.Module, LayerReport]:
    """Return the replacement for one selected layer and its report row."""
    observer_layer = module if isinstance(module, ObservedLayer) else None
    float_module = observer_layer.module if observer_layer else module
    weight = float_module.weight
    report = LayerReport(name, type(float_module).__name__, True, float_bytes=_tensor_bytes(weight))

    if not config.is_integer:
        layer = CastLayer.from_float(float_module, CAST_DTYPES[config.dtype])
        report.format = config.dtype
        report.quantized_bytes = _tensor_bytes(layer.module.weight)
        return layer, report

    input_qparams = None
    if config.needs_calibration:
        if observer_layer is None or not observer_layer.input_observer.observed:
            report.quantized = False
            report.reason = "received no input during calibration, so it has no activation range"
            return float_module, report
        input_qparams = observer_layer.input_observer.calculate_qparams()

    weight_spec = config.weight_spec()
    weight_observer = make_observer(config.weight_observer, weight_spec)
    weight_observer.name = f"the weight of layer '{name}'"
    weight_observer(weight.detach())

    # select_layers only selects types that have a counterpart, so this is never None.
    quantized_type = cast(type[QuantizedLayer], quantized_counterpart(float_module))
    layer: QuantizedLayer = quantized_type.from_float(
        float_module,
        weight_spec,
        activations=config.activations,  # type: ignore[arg-type]
        input_qparams=input_qparams,
        weight_qparams=weight_observer.calculate_qparams(),
    )
    report.format = config.label
    report.reason = _group_note(weight, config)
    report.quantized_bytes = _tensor_bytes(
        layer.weight_codes, layer.weight_scale, layer.weight_zero_point
    )
    return layer, report


def _float_row(decision: LayerDecision, model: nn.Module) -> LayerReport:
    module = model.get_submodule(decision.name)
    float_bytes = _tensor_bytes(*module.parameters(recurse=False))
    return LayerReport(
        decision.name, decision.type_name, False, reason=decision.reason, float_bytes=float_bytes
    )


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every selected layer replaced by its quantized counterpart.

    Layers kept in float are listed with the reason in :func:`quantization_report` and logged;
    a selected layer that received no calibration input also raises a warning.

    Raises:
        ValueError: when the model was not prepared or was already converted.
    """
    state = get_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not prepared; call mono_quant.prepare(model, config) "
            "first, or use mono_quant.quantize(model, config) for all steps at once."
        )
    if state.report is not None:
        raise ValueError(f"{type(model).__name__} is already converted.")
    if not inplace:
        model = copy.deepcopy(model)
        state = cast(QuantizationState, get_state(model))

    report = QuantizationReport(config=state.config.to_dict())
    for decision in state.decisions:
        if not decision.quantize:
            report.layers.append(_float_row(decision, model))
            continue
        with torch.no_grad():
            layer, row = _quantize_layer(
                model.get_submodule(decision.name), decision.name, state.config
            )
        model = replace_module(model, decision.name, layer)
        report.layers.append(row)

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
