"""Quantization state that travels with a prepared or converted model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.nn.quantized import NAME_ATTRIBUTE
from mono_quant.transform.report import QuantizationReport
from mono_quant.transform.select import LayerDecision

STATE_ATTRIBUTE = "_mono_quant_state"


@dataclass
class QuantizationState:
    """The config, the layer decisions of ``prepare`` and, after ``convert``, its report.

    ``layer_configs`` contains the configs of layers that ``config.overrides`` changed.
    ``budget`` is the report of a metric-budget search when one chose the per-layer formats.
    """

    config: QuantConfig
    decisions: list[LayerDecision]
    report: QuantizationReport | None = None
    mode: str = "ptq"
    layer_configs: dict[str, QuantConfig] = field(default_factory=dict)
    budget: Any = None

    def config_for(self, name: str) -> QuantConfig:
        """Return the config that layer ``name`` is quantized with."""
        return self.layer_configs.get(name, self.config)

    @property
    def needs_calibration(self) -> bool:
        """True when a selected layer uses static activations."""
        selected = [d.name for d in self.decisions if d.quantize]
        return any(self.config_for(name).needs_calibration for name in selected)


def get_state(model: nn.Module) -> QuantizationState | None:
    """Return the state stored on ``model`` by ``prepare``, or ``None``."""
    return getattr(model, STATE_ATTRIBUTE, None)


def set_state(model: nn.Module, state: QuantizationState) -> None:
    """Store ``state`` on ``model`` as a plain attribute (not in ``state_dict``)."""
    # object.__setattr__ keeps nn.Module from treating the dataclass as a submodule or buffer.
    object.__setattr__(model, STATE_ATTRIBUTE, state)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at qualified ``name`` in ``root``; return the root, or ``new`` for name ""."""
    # Recorded for error messages. A plain attribute, so it stays out of state_dict.
    new.__dict__[NAME_ATTRIBUTE] = name
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    return root


def quantization_report(model: nn.Module) -> QuantizationReport:
    """Return the per-layer report of a model produced by ``convert`` or ``quantize``."""
    state = get_state(model)
    if state is None or state.report is None:
        raise ValueError(
            f"{type(model).__name__} has no quantization report; pass a model returned by "
            "mono_quant.quantize or mono_quant.convert."
        )
    return state.report
