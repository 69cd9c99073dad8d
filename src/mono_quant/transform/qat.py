"""Quantization-aware training: insert fake quantization, schedule it, convert the result."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, cast

import torch
from torch import nn

from mono_quant.config import QuantConfig, resolve_config
from mono_quant.core.observers import make_observer
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.chain import plan_int8_chains
from mono_quant.nn.fake_quant import FakeQuantize
from mono_quant.nn.qat import (
    CONV_BN_PATTERNS,
    QAT_MODULES,
    QATLinear,
    _QATConvBnNd,
    _QATMixin,
    bn_fold_factor,
)
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import QUANTIZED_MODULES
from mono_quant.transform.convert import _float_row, _group_note, _takes, _tensor_bytes
from mono_quant.transform.report import LayerReport, QuantizationReport
from mono_quant.transform.select import LayerDecision, select_layers
from mono_quant.transform.state import QuantizationState, get_state, replace_module, set_state

# At this width and below, scales are learned by default: the rounding error is large enough
# that a range taken from min/max clips too little and wastes levels.
LEARNABLE_SCALE_MAX_BITS = 4


@dataclass(frozen=True)
class QATSchedule:
    """Flags for one training step: whether fake quantization, observers and BN stats are live."""

    fake_quant: bool = True
    observers: bool = True
    freeze_bn: bool = False


def _weight_quantizer(weight: torch.Tensor, config: QuantConfig, learnable: bool) -> FakeQuantize:
    spec = config.weight_spec()
    quantizer = FakeQuantize(spec, shape=tuple(weight.shape), learnable_scale=learnable)
    quantizer.to(weight.device)
    # Weights are known now, so the quantizer starts initialised from their own range.
    quantizer._refresh_qparams(weight.detach())
    return quantizer


def _input_quantizer(config: QuantConfig, device: torch.device) -> FakeQuantize | None:
    if config.activations != "static":
        return None
    observer = make_observer(config.observer, STATIC_SPEC)
    observer.reduce_batch_ranges = True
    return FakeQuantize(STATIC_SPEC, observer=observer).to(device)


def _conv_bn_pairs(model: nn.Module, selected: set[str]) -> dict[str, str]:
    """Map a selected conv's name to the name of the batch norm that follows it in a Sequential."""
    pairs = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in pairwise(children):
            full_conv = f"{parent_name}.{conv_name}" if parent_name else conv_name
            pattern = (type(conv), type(bn))
            if (
                pattern in CONV_BN_PATTERNS
                and full_conv in selected
                and bn.affine
                and bn.track_running_stats
            ):
                pairs[full_conv] = f"{parent_name}.{bn_name}" if parent_name else bn_name
    return pairs


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | str | None = None,
    learnable_scale: bool | None = None,
    fold_bn: bool = True,
) -> nn.Module:
    """Swap fake-quantized layers into ``model`` in place and return it.

    The new layers take over the float layers' Parameter objects, so an optimizer built before
    or after this call trains the same tensors. Learnable scales (``learnable_scale``, default
    on at 4 bits and below) are new Parameters that ``model.parameters()`` returns.
    With ``fold_bn``, a ``Conv1d/2d/3d`` directly followed by a ``BatchNorm1d/2d/3d`` inside an
    ``nn.Sequential`` trains with the batch norm folded into the quantized weight.

    Raises:
        ValueError: for a 16-bit float config or a model that is already prepared.
    """
    config = resolve_config(config)
    if config.overrides:
        raise ValueError(
            f"QAT uses one config for every layer, but overrides={config.to_dict()['overrides']} "
            "was given; keep layers in float with exclude=[...], or apply overrides with "
            "post-training quantization (mode='ptq')."
        )
    if not config.is_integer:
        raise ValueError(
            f"QAT needs integer weights (bits 2 to 8), got dtype={config.dtype!r}; float16 and "
            "bfloat16 casts need no training: use PTQ (mode='ptq')."
        )
    if get_state(model) is not None:
        raise ValueError(f"{type(model).__name__} is already prepared by mono_quant.")
    learnable = (
        config.bits <= LEARNABLE_SCALE_MAX_BITS if learnable_scale is None else learnable_scale
    )

    decisions = [
        _qat_decision(decision, model)
        for decision in select_layers(model, config.include, config.exclude)
    ]
    selected = {d.name for d in decisions if d.quantize}
    pairs = _conv_bn_pairs(model, selected) if fold_bn else {}

    for decision in decisions:
        if not decision.quantize:
            continue
        float_module = model.get_submodule(decision.name)
        device = float_module.weight.device
        activations = cast(Any, config.activations)
        input_quantizer = _input_quantizer(config, device)
        if decision.name in pairs:
            bn = model.get_submodule(pairs[decision.name])
            qat_type = CONV_BN_PATTERNS[(type(float_module), type(bn))]
            folded = _fold_for_init(float_module, bn)
            layer = qat_type.from_conv_bn(
                float_module,
                bn,
                _weight_quantizer(folded, config, learnable),
                activations,
                input_quantizer,
            )
            model = replace_module(model, pairs[decision.name], nn.Identity())
        else:
            qat_type = QAT_MODULES[type(float_module)]
            weight_quantizer = _weight_quantizer(float_module.weight, config, learnable)
            layer = qat_type.from_float(
                float_module, weight_quantizer, activations, input_quantizer
            )
            if activations == "dynamic" and isinstance(layer, QATLinear):
                # Training rounds inputs on the grid the converted QuantLinear will use.
                layer.activation_granularity = config.activation_granularity
        model = replace_module(model, decision.name, layer)

    set_state(model, QuantizationState(config=config, decisions=decisions, mode="qat"))
    return model


def _qat_decision(decision: LayerDecision, model: nn.Module) -> LayerDecision:
    """Keep ``decision`` unless its layer type has no QAT counterpart, which then stays float."""
    if not decision.quantize:
        return decision
    module = model.get_submodule(decision.name)
    if type(module) in QAT_MODULES:
        return decision
    supported = ", ".join(t.__name__ for t in QAT_MODULES)
    reason = f"QAT covers {supported}; {type(module).__name__} stays in float during QAT"
    return replace(decision, quantize=False, reason=reason)


def _fold_for_init(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    with torch.no_grad():
        factor = bn_fold_factor(bn)
        return conv.weight * factor.reshape(-1, *([1] * (conv.weight.dim() - 1)))


def qat_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, layer)`` for every QAT layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _QATMixin):
            yield name, module


def fake_quant_bytes(model: nn.Module) -> int:
    """Return the bytes of QAT-only state: quantizer scales, observers, flags and learned scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            tensors = [*module.parameters(), *module.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
        elif isinstance(module, _QATConvBnNd):
            total += module.freeze_bn.numel() * module.freeze_bn.element_size()
    return total


def apply_schedule(model: nn.Module, schedule: QATSchedule) -> None:
    """Set the fake-quant, observer and batch-norm flags of every QAT layer in ``model``."""
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            module.fake_quant_enabled.fill_(int(schedule.fake_quant))
            module.observer_enabled.fill_(int(schedule.observers))
        if isinstance(module, _QATConvBnNd):
            module.freeze_bn.fill_(int(schedule.freeze_bn))
        elif schedule.freeze_bn and isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Unfolded batch norms keep their running statistics from here on.
            module.eval()


def _float_equivalent(layer: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """Return a plain float layer computing what ``layer`` computes in eval mode, and its weight."""
    if isinstance(layer, _QATConvBnNd):
        weight, bias = layer.folded_weight_and_bias()
    else:
        weight, bias = layer.weight, layer.bias

    factory = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        plain: nn.Module = nn.Linear(
            layer.in_features, layer.out_features, bias is not None, **factory
        )
    else:
        conv = cast(nn.modules.conv._ConvNd, layer)
        base = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, t))
        plain = base(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=bias is not None,
            padding_mode=conv.padding_mode,
            **factory,
        )
    plain.weight.data.copy_(weight.detach())
    if bias is not None:
        plain.bias.data.copy_(bias.detach())
    return plain, plain.weight


def _convert_layer(
    name: str, layer: nn.Module, config: QuantConfig
) -> tuple[nn.Module, LayerReport]:
    plain, weight = _float_equivalent(layer)
    report = LayerReport(name, type(plain).__name__, True, float_bytes=_tensor_bytes(weight))
    if isinstance(layer, _QATConvBnNd):
        report.type_name += f" + {type(layer.bn).__name__}"

    input_qparams = None
    if config.activations == "static":
        quantizer = layer.input_fake_quant
        if quantizer is None or not bool(quantizer.initialized):
            report.quantized = False
            report.reason = "its input quantizer never saw training data, so it has no range"
            return plain, report
        input_qparams = (quantizer.current_scale().detach(), quantizer.zero_point)

    weight_qparams = layer.weight_fake_quant.current_qparams(weight)
    quantized_type = QUANTIZED_MODULES[type(plain)]
    options: dict[str, Any] = {}
    if config.activations == "dynamic" and _takes(quantized_type, "activation_granularity"):
        options["activation_granularity"] = config.activation_granularity
    quantized: QuantizedLayer = quantized_type.from_float(
        plain,
        config.weight_spec(),
        activations=cast(Any, config.activations),
        input_qparams=input_qparams,
        weight_qparams=(weight_qparams[0].detach(), weight_qparams[1]),
        **options,
    )
    report.format = config.label
    report.reason = _group_note(weight, config)
    report.quantized_bytes = _tensor_bytes(
        quantized.weight_codes, quantized.weight_scale, quantized.weight_zero_point
    )
    return quantized, report


def convert_qat(model: nn.Module) -> nn.Module:
    """Return a copy of a QAT model with every QAT layer replaced by an integer layer.

    The converted layers use the qparams the fake quantizers apply in eval mode, so their
    outputs match the QAT model's eval outputs up to float rounding of the matmul.

    Raises:
        ValueError: when ``model`` was not prepared by :func:`prepare_qat`.
    """
    state = get_state(model)
    if state is None or state.mode != "qat":
        raise ValueError(
            f"{type(model).__name__} has no QAT layers; call mono_quant.prepare_qat first, or "
            "use mono_quant.quantize for post-training quantization."
        )
    converted = copy.deepcopy(model)
    converted.eval()
    report = QuantizationReport(config=state.config.to_dict())
    names = {name for name, _ in qat_layers(converted)}
    for decision in state.decisions:
        if not decision.quantize:
            if isinstance(converted.get_submodule(decision.name), nn.Identity):
                # A batch norm folded into the conv before it; the conv's row names both.
                continue
            report.layers.append(_float_row(decision, converted))
            continue
        if decision.name not in names:
            continue
        with torch.no_grad():
            layer, row = _convert_layer(
                decision.name, converted.get_submodule(decision.name), state.config
            )
        converted = replace_module(converted, decision.name, layer)
        report.layers.append(row)

    untrained = [row.name for row in report.float_layers if row.reason.startswith("its input")]
    if untrained:
        warnings.warn(
            f"layers {untrained} stay in float: their input ranges were never observed.",
            stacklevel=2,
        )
    plan_int8_chains(converted)
    set_state(
        converted, QuantizationState(config=state.config, decisions=state.decisions, report=report)
    )
    return converted
