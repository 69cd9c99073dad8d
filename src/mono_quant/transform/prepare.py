"""``prepare``: choose the layers to quantize and attach activation observers."""

from __future__ import annotations

import copy
import warnings

from torch import nn

from mono_quant.config import QuantConfig, resolve_config
from mono_quant.core.observers import make_observer
from mono_quant.nn.activation import STATIC_SPEC
from mono_quant.nn.attention import disable_fused_transformer_paths
from mono_quant.nn.observed import ObservedLayer
from mono_quant.nn.registry import calibrates_input
from mono_quant.transform.overrides import apply_overrides
from mono_quant.transform.select import select_layers
from mono_quant.transform.state import QuantizationState, get_state, replace_module, set_state


def prepare(
    model: nn.Module, config: QuantConfig | str | None = None, inplace: bool = False
) -> nn.Module:
    """Return ``model`` ready for calibration and ``convert``.

    Selects layers by ``config.include``/``config.exclude``, applies ``config.overrides`` and,
    for layers with static activations, wraps
    each selected layer in an :class:`ObservedLayer` that records its input range. The model is
    deep-copied first unless ``inplace`` is True.

    Raises:
        ValueError: when the model was already prepared or converted.
    """
    config = resolve_config(config)
    if get_state(model) is not None:
        raise ValueError(
            f"{type(model).__name__} was already prepared by mono_quant; pass the float model, "
            "or call convert on this one."
        )
    if not inplace:
        model = copy.deepcopy(model)

    decisions = select_layers(model, config.include, config.exclude)
    decisions, layer_configs = apply_overrides(model, config, decisions)
    selected = [decision for decision in decisions if decision.quantize]
    if not selected:
        patterns = f" include={list(config.include)}" if config.include is not None else ""
        warnings.warn(
            f"no layer of {type(model).__name__} was selected for quantization{patterns}; "
            "check the include/exclude patterns against mono_quant.quantization_report or "
            "model.named_modules().",
            stacklevel=2,
        )

    state = QuantizationState(config=config, decisions=decisions, layer_configs=layer_configs)
    if state.needs_calibration:
        for decision in selected:
            layer = model.get_submodule(decision.name)
            layer_config = state.config_for(decision.name)
            if not layer_config.needs_calibration:
                continue
            if not calibrates_input(layer):
                # Embeddings take integer indices, and recurrent and attention layers quantize
                # their activations dynamically under a static config: no input observer.
                continue
            observer = make_observer(layer_config.observer, STATIC_SPEC)
            model = replace_module(
                model, decision.name, ObservedLayer(layer, observer, decision.name)
            )
        # Fused transformer paths read linear1.weight directly, which an ObservedLayer lacks.
        disable_fused_transformer_paths(model)

    set_state(model, state)
    return model
