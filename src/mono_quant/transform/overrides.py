"""Per-layer configs: apply ``QuantConfig.overrides`` to the layer decisions of ``prepare``."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.transform.select import LayerDecision, matches


def apply_overrides(
    model: nn.Module, config: QuantConfig, decisions: list[LayerDecision]
) -> tuple[list[LayerDecision], dict[str, QuantConfig]]:
    """Return the decisions with overridden-to-float layers kept float, and each layer's config.

    The mapping contains a config for every quantized layer that an override pattern matches;
    the others use ``config`` itself.

    Raises:
        ValueError: when an override pattern matches none of the layers selected for
            quantization (a typo would otherwise change nothing without a word).
    """
    if not config.overrides:
        return decisions, {}

    used: set[str] = set()
    layer_configs: dict[str, QuantConfig] = {}
    updated = []
    for decision in decisions:
        if not decision.quantize:
            updated.append(decision)
            continue
        module = model.get_submodule(decision.name)
        pattern = next((p for p, _ in config.overrides if matches(decision.name, module, p)), None)
        if pattern is None:
            updated.append(decision)
            continue
        used.add(pattern)
        layer_config = config.for_layer(decision.name, module)
        if layer_config is None:
            reason = f"kept in float by override {pattern!r}"
            updated.append(replace(decision, quantize=False, reason=reason))
            continue
        layer_configs[decision.name] = layer_config
        updated.append(decision)

    unused = [pattern for pattern, _ in config.overrides if pattern not in used]
    if unused:
        selected = [d.name for d in decisions if d.quantize]
        raise ValueError(
            f"overrides patterns {unused} take effect on no layer of {type(model).__name__}: "
            "they match no layer selected for quantization, or only layers that an earlier "
            f"pattern already matched (the first match wins; selected: {selected}). Fix or "
            "reorder the patterns, or drop them."
        )
    return updated, layer_configs
