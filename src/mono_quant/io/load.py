"""Rebuild a quantized model from a mono-quant file on a float model of the same architecture."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.config import QuantConfig
from mono_quant.core.spec import QuantSpec
from mono_quant.io.read import read_artifact
from mono_quant.nn.attention import disable_fused_transformer_paths
from mono_quant.nn.cast import CAST_DTYPES
from mono_quant.nn.chain import plan_int8_chains
from mono_quant.nn.parametrized import quantize_parameter
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.registry import cast_counterpart, quantized_counterpart
from mono_quant.transform.report import LayerReport, QuantizationReport
from mono_quant.transform.select import LayerDecision
from mono_quant.transform.state import QuantizationState, get_state, replace_module, set_state

_SAME_ARCHITECTURE = (
    "build the model with the same class and constructor arguments as the model that was quantized"
)


def _label(name: str) -> str:
    return name or "(root)"


def config_from_header(header: Mapping[str, Any]) -> QuantConfig:
    """Return the :class:`QuantConfig` stored in a mono-quant header.

    Raises:
        ValueError: when the stored config has fields this version does not know or values it
            rejects.
    """
    stored = header.get("config")
    if not isinstance(stored, Mapping):
        raise ValueError("the header has no config; save the model again with mono_quant.save.")
    known = {field.name for field in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(
            f"the stored config has fields {unknown} that this mono_quant does not know; it was "
            f"written by mono_quant {header.get('mono_quant_version')}, so upgrade mono_quant."
        )
    try:
        return QuantConfig(**stored)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the stored config is invalid: {error}") from None


def layer_reports_from_header(header: Mapping[str, Any]) -> list[LayerReport]:
    """Return the per-layer rows of a mono-quant header, ignoring fields this version lacks."""
    known = {field.name for field in dataclasses.fields(LayerReport)}
    rows = header.get("layers")
    if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
        raise ValueError("the header has no per-layer list; save the model again.")
    try:
        return [LayerReport(**{k: v for k, v in row.items() if k in known}) for row in rows]
    except TypeError as error:
        raise ValueError(f"the header's per-layer list is damaged: {error}") from None


def quantized_layer_names(state_dict: Mapping[str, Any]) -> list[str]:
    """Return the names of the quantized layers whose tensors ``state_dict`` contains.

    A float model cannot load such a state; :func:`load` rebuilds the quantized layers first.
    """
    suffix = ".weight_codes"
    names = [key.removesuffix(suffix) for key in state_dict if key.endswith(suffix)]
    if "weight_codes" in state_dict:
        names.insert(0, "")
    return names


def _find_layer(model: nn.Module, row: LayerReport) -> tuple[nn.Module, str | None]:
    """Return the module a report row names and, for a parameter row, the parameter's name.

    ``convert`` reports layers by module name and parameters stored through
    ``config.parameters`` by qualified parameter name with the type ``Module.attribute``.
    """
    try:
        module = model.get_submodule(row.name)
    except AttributeError:
        module = None
    if module is not None:
        if type(module).__name__ != row.type_name:
            raise ValueError(
                f"layer '{_label(row.name)}' is a {row.type_name} in the file but a "
                f"{type(module).__name__} in {type(model).__name__}; {_SAME_ARCHITECTURE}."
            )
        return module, None

    owner_name, _, attribute = row.name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    if owner is None or attribute not in owner._parameters:
        raise ValueError(
            f"layer '{_label(row.name)}' ({row.type_name}) is stored in the file but "
            f"{type(model).__name__} has no such layer or parameter; {_SAME_ARCHITECTURE}."
        )
    if f"{type(owner).__name__}.{attribute}" != row.type_name:
        raise ValueError(
            f"parameter '{row.name}' belongs to a {row.type_name.rpartition('.')[0]} in the file "
            f"but to a {type(owner).__name__} in {type(model).__name__}; {_SAME_ARCHITECTURE}."
        )
    return owner, attribute


def _weight_spec(layout: Any, config: QuantConfig) -> QuantSpec:
    """Return the weight spec saved in a layer's extra state, or the config's when absent."""
    if not isinstance(layout, Mapping) or "bits" not in layout:
        return config.weight_spec()
    return QuantSpec(
        bits=layout["bits"],
        symmetric=layout["symmetric"],
        granularity=layout["granularity"],
        axis=layout["axis"],
        group_size=layout["group_size"],
    )


def _float_weights(quantized_type: type[QuantizedLayer], module: nn.Module) -> dict[str, Any]:
    return dict(quantized_type.float_weights(module))


def _check_weight_shapes(weights: Mapping[str, Any], layout: Any, name: str) -> None:
    if not isinstance(layout, Mapping):
        return
    saved = layout.get("weight_shapes")
    if saved is None and "weight_shape" in layout:
        saved = {"weight": layout["weight_shape"]}
    if not isinstance(saved, Mapping):
        return
    actual = {weight_name: list(weight.shape) for weight_name, weight in weights.items()}
    expected = {weight_name: list(shape) for weight_name, shape in saved.items()}
    if actual != expected:
        differing = sorted(set(actual) ^ set(expected)) or [
            key for key in expected if actual[key] != expected[key]
        ]
        key = differing[0]
        raise ValueError(
            f"layer '{_label(name)}' has weight {key!r} of shape {actual.get(key)} but the file "
            f"stores {expected.get(key)}; {_SAME_ARCHITECTURE}."
        )


def _saved_qparams(
    state_dict: Mapping[str, Any], prefix: str, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return the saved (scale, zero_point) of each weight name found in ``state_dict``."""
    qparams = {}
    for weight_name in names:
        scale = state_dict.get(f"{prefix}{weight_name}_scale")
        if not isinstance(scale, torch.Tensor):
            continue
        zero_point = state_dict.get(f"{prefix}{weight_name}_zero_point")
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        qparams[weight_name] = (scale, zero_point)
    return qparams


def _build_quantized_layer(
    module: nn.Module,
    name: str,
    config: QuantConfig,
    state_dict: Mapping[str, Any],
) -> nn.Module:
    """Build the quantized counterpart of ``module`` with the layout saved in ``state_dict``.

    The counterpart comes from the registry, as in ``convert``. Its codes are placeholders until
    the saved ones are copied in. The saved qparams are reused, so the skeleton's own weights
    are only read for their shapes.
    """
    quantized_type = quantized_counterpart(module)
    if quantized_type is None:
        raise ValueError(
            f"layer '{_label(name)}' ({type(module).__name__}) is quantized in the file, but "
            "this mono_quant has no quantized counterpart for it; upgrade mono_quant."
        )
    if not config.is_integer:
        return cast_counterpart(module).from_float(module, CAST_DTYPES[config.dtype])

    prefix = f"{name}." if name else ""
    layout = state_dict.get(prefix + "_extra_state")
    weights = _float_weights(quantized_type, module)
    _check_weight_shapes(weights, layout, name)
    spec = _weight_spec(layout, config)
    activations = layout.get("activations") if isinstance(layout, Mapping) else config.activations

    input_qparams = None
    if activations == "static":
        scale = state_dict.get(prefix + "input_scale")
        zero_point = state_dict.get(prefix + "input_zero_point")
        if scale is None or zero_point is None:
            raise ValueError(
                f"layer '{_label(name)}' uses static activations but the file has no "
                "input_scale/input_zero_point for it; the file is damaged."
            )
        input_qparams = (scale, zero_point)

    qparams = _saved_qparams(state_dict, prefix, list(weights))
    # As in convert: single-weight layers take one qparams pair, the others a mapping by name.
    weight_qparams: Any = qparams.get("weight") if list(weights) == ["weight"] else qparams
    return quantized_type.from_float(
        module,
        spec,
        activations=activations,
        input_qparams=input_qparams,
        weight_qparams=weight_qparams or None,
    )


def _store_parameter(
    owner: nn.Module,
    attribute: str,
    name: str,
    config: QuantConfig,
    state_dict: Mapping[str, Any],
) -> None:
    """Store parameter ``attribute`` of ``owner`` quantized, with the layout saved for it."""
    if not config.is_integer:
        quantize_parameter(owner, attribute, dtype=CAST_DTYPES[config.dtype])
        return
    # torch.nn.utils.parametrize keeps the storage at <owner>.parametrizations.<name>.0.
    owner_name = name.rpartition(".")[0]
    owner_prefix = f"{owner_name}." if owner_name else ""
    prefix = f"{owner_prefix}parametrizations.{attribute}.0."
    layout = state_dict.get(prefix + "_extra_state")
    _check_weight_shapes({"weight": owner._parameters[attribute]}, layout, name)
    qparams = _saved_qparams(state_dict, prefix, ["weight"]).get("weight")
    quantize_parameter(owner, attribute, _weight_spec(layout, config), qparams)


def _load_layer_state(layer: nn.Module, name: str, state_dict: Mapping[str, Any]) -> None:
    """Copy the saved tensors of one layer, so a mismatch names the layer it happens in."""
    prefix = f"{name}." if name else ""
    layer_state = {
        key.removeprefix(prefix): value
        for key, value in state_dict.items()
        if key.startswith(prefix)
    }
    try:
        layer.load_state_dict(layer_state, strict=True)
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ValueError(
            f"layer '{_label(name)}' does not fit the saved state ({details}); "
            f"{_SAME_ARCHITECTURE}."
        ) from None


def _tensor_slot(model: nn.Module, key: str) -> tuple[dict[str, Any], str] | None:
    """Return the ``_parameters`` or ``_buffers`` dict that contains state_dict entry ``key``."""
    module_name, _, attribute = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    for slots in (module._parameters, module._buffers):
        if slots.get(attribute) is not None:
            return slots, attribute
    return None


def _tie_shared_tensors(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Make entries that share storage in ``state_dict`` one tensor in ``model`` as well.

    ``convert`` stores a float tensor shared by several layers (an embedding tied to its
    output head) once, and ``torch.save``/``torch.load`` keep that sharing. Rebuilt layers get
    their own tensors, so they are pointed at one of them here, before the state is copied.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            identity = (
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            groups.setdefault(identity, []).append(key)
    for keys in groups.values():
        slots = [_tensor_slot(model, key) for key in keys]
        if len(keys) < 2 or any(slot is None for slot in slots):
            continue
        first_slots, first_attribute = slots[0]  # type: ignore[misc]
        shared = first_slots[first_attribute]
        for other_slots, attribute in slots[1:]:  # type: ignore[misc]
            current = other_slots[attribute]
            same_kind = isinstance(current, nn.Parameter) == isinstance(shared, nn.Parameter)
            if same_kind and current.shape == shared.shape and current.dtype == shared.dtype:
                other_slots[attribute] = shared


def _layer_message(name: str, error: BaseException) -> str:
    message = " ".join(str(error).split())
    return message if message.startswith("layer '") else f"layer '{_label(name)}': {message}"


def _set_loaded_state(model: nn.Module, config: QuantConfig, rows: list[LayerReport]) -> None:
    decisions = [
        LayerDecision(row.name, row.type_name, row.quantized, "" if row.quantized else row.reason)
        for row in rows
    ]
    report = QuantizationReport(config=config.to_dict(), layers=rows)
    layer_configs = {}
    if config.overrides:
        for decision in decisions:
            layer_config = config.for_layer(decision.name)
            if decision.quantize and layer_config is not None:
                layer_configs[decision.name] = layer_config
    state = QuantizationState(
        config=config, decisions=decisions, report=report, layer_configs=layer_configs
    )
    set_state(model, state)


def rebuild_quantized_layers(
    model: nn.Module, header: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> nn.Module:
    """Replace, in place, the layers that ``header`` lists as quantized; return the model.

    ``header`` is a mono-quant header (:func:`mono_quant.io.quantization_header`) and
    ``state_dict`` the quantized model's state, whose per-layer layouts decide bits and
    granularity. Each quantized layer is built through the registry
    (``quantized_counterpart(module).from_float``) on the float layer of the same name, or as a
    :class:`CastLayer` for 16-bit configs, and receives its saved tensors. The float layers are
    not loaded yet: call :func:`load_quantized_state_dict` next. The returned model is ``model``
    itself unless the root is one quantized layer.

    Raises:
        ValueError: when ``model`` is not a float model, or a layer is missing, has another
            type or another weight shape than in the file.
    """
    if get_state(model) is not None:
        raise ValueError(
            f"{type(model).__name__} was already prepared or quantized by mono_quant; pass a "
            "float model of the same architecture."
        )
    config = config_from_header(header)
    rows = layer_reports_from_header(header)
    quantized_types = header.get("quantized_types") or {}

    replacements: list[tuple[str, nn.Module]] = []
    parameters: list[tuple[nn.Module, str, str]] = []
    for row in rows:
        module, attribute = _find_layer(model, row)
        if not row.quantized:
            continue
        if attribute is not None:
            parameters.append((module, attribute, row.name))
            continue
        try:
            layer_config = config.for_layer(row.name, module) or config
            layer = _build_quantized_layer(module, row.name, layer_config, state_dict)
            _load_layer_state(layer, row.name, state_dict)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(_layer_message(row.name, error)) from None
        saved_type = str(quantized_types.get(row.name, type(layer).__qualname__))
        if saved_type.rsplit(".", 1)[-1] != type(layer).__qualname__:
            raise ValueError(
                f"layer '{_label(row.name)}' was saved as {saved_type}, but this mono_quant "
                f"builds {type(layer).__qualname__} for {row.type_name}; load the file with "
                f"mono_quant {header.get('mono_quant_version')}, which wrote it."
            )
        # A fresh module starts in training mode; the replaced layer's mode is kept instead,
        # because it decides, for example, whether attention applies dropout.
        layer.train(module.training)
        replacements.append((row.name, layer))

    # Layers are swapped only after every one was built, so a mismatch leaves the model as is.
    for name, layer in replacements:
        model = replace_module(model, name, layer)
    # Parameters named in config.parameters are stored after the layers, as convert does.
    for owner, attribute, name in parameters:
        try:
            _store_parameter(owner, attribute, name, config, state_dict)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(_layer_message(name, error)) from None
    _tie_shared_tensors(model, state_dict)
    disable_fused_transformer_paths(model)
    plan_int8_chains(model)
    _set_loaded_state(model, config, rows)
    return model


def load_quantized_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Copy ``state_dict`` into a model rebuilt by :func:`rebuild_quantized_layers`, strictly.

    Raises:
        ValueError: when keys are missing or unexpected, a tensor has another shape, or a
            quantized layer's saved layout differs from the rebuilt one.
    """
    expected = set(model.state_dict())
    provided = set(state_dict)
    missing = sorted(expected - provided)
    unexpected = sorted(provided - expected)
    if missing or unexpected:
        raise ValueError(
            f"the saved state does not match {type(model).__name__}: missing keys "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; {_SAME_ARCHITECTURE}."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ValueError(
            f"the saved state does not fit {type(model).__name__} ({details}); "
            f"{_SAME_ARCHITECTURE}."
        ) from None


def load(path: str | os.PathLike[str], model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the quantized model stored at ``path``, rebuilt on the float ``model``.

    ``model`` is a float model of the same architecture as the one that was quantized, for
    example freshly constructed: its weights are replaced by the saved ones, so only its
    structure matters. The file is read with ``torch.load(weights_only=True)`` and never runs
    pickled code. In the same mode (the result keeps ``model``'s training flag, so call
    ``.eval()`` for inference), the result computes exactly the outputs of the model that was
    saved, also in another process, and ``mono_quant.quantization_report`` works on it.

    Args:
        path: file written by :func:`mono_quant.save` or ``QuantizeCallback``.
        model: float skeleton; it is deep-copied first unless ``inplace`` is True.
        inplace: change ``model`` itself (saves memory). Use the return value either way, since
            a model that is a single quantized layer is replaced. NOTE: with ``inplace`` a
            mismatch found in the float layers leaves ``model`` with its quantized layers
            already swapped in.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        TypeError: when ``model`` is not an ``nn.Module``.
        ValueError: when the file is not a readable mono-quant file, is from a newer format
            version, or does not match ``model``'s architecture.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a float nn.Module of the saved architecture, got "
            f"{type(model).__name__}; for example mono_quant.load(path, MyModel())."
        )
    artifact = read_artifact(path)
    try:
        if not inplace:
            model = copy.deepcopy(model)
        model = rebuild_quantized_layers(model, artifact, artifact["state_dict"])
        load_quantized_state_dict(model, artifact["state_dict"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return model
