"""Write quantized models to files that load without executing pickled code."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.transform.state import get_state, quantization_report

ARTIFACT_FORMAT = "mono-quant"
ARTIFACT_VERSION = 1


def _stored_class(model: nn.Module, name: str) -> str:
    """Return the class path of the module that stores report row ``name``.

    A row names a quantized layer, or a parameter stored through ``config.parameters``, whose
    storage is the first parametrization registered on it.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        owner_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner_name).parametrizations[attribute][0]
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def plain_value(value: Any, where: str) -> Any:
    """Return ``value`` rebuilt from built-in types that a weights-only load accepts.

    Subclasses of ``int``, ``float`` and ``str`` become the built-in type, because the
    weights-only unpickler rejects any other class. Argument parsers such as jsonargparse
    produce such subclasses (``PositiveInt``). Tuples become lists.

    Raises:
        TypeError: for any value other than str, int, float, bool, None, tensors, and lists,
            tuples or dicts of them; ``where`` names it in the message.
    """
    if value is None or isinstance(value, (bool, torch.Tensor)):
        return value
    for plain in (int, float, str):
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str keys.")
            plain_key = str(key) if isinstance(key, str) else int(key)
            result[plain_key] = plain_value(item, f"{where}[{key!r}]")
        return result
    if isinstance(value, (list, tuple)):
        return [plain_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(
        f"{where} has type {type(value).__name__}, which a weights-only load cannot read back; use "
        "str, int, float, bool, None, tensors, and lists or dicts of them."
    )


def plain_state_dict(state_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace, in place, the non-tensor entries of ``state_dict`` by plain values; return it.

    Quantized layers keep their layout as extra state, a dict whose ints may come from an
    argument parser's ``int`` subclass. The mapping itself is kept, so its ``_metadata`` (the
    module versions that ``load_state_dict`` reads) survives.
    """
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            state_dict[key] = plain_value(value, f"state_dict[{key!r}]")
    return state_dict


def quantization_header(model: nn.Module) -> dict[str, Any]:
    """Return the header that describes how ``model`` was quantized, without its tensors.

    The header contains the format name and version, the package and torch versions, the
    config, the per-layer report (``layers``) and the class path of every quantized layer
    (``quantized_types``). It is made of plain Python values only.

    Raises:
        ValueError: when ``model`` was not produced by ``mono_quant.quantize``/``convert``.
    """
    from mono_quant import __version__

    report = quantization_report(model)
    state = get_state(model)
    header = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "mono_quant_version": str(__version__),
        "torch_version": str(torch.__version__),
        "mode": str(getattr(state, "mode", "ptq")),
        "config": report.config,
        "layers": report.to_dict()["layers"],
        "quantized_types": {
            row.name: _stored_class(model, row.name) for row in report.quantized_layers
        },
    }
    return plain_value(header, "the quantization header")


def save(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Save a quantized model's ``state_dict`` with a header describing how it was quantized.

    The file contains only tensors and plain Python values, so ``torch.load(path,
    weights_only=True)`` reads it. The header is :func:`quantization_header`; ``metadata`` adds
    plain values of your own. :func:`mono_quant.load` rebuilds the model from the file on a
    float model of the same architecture.

    Raises:
        ValueError: when ``model`` was not produced by ``mono_quant.quantize``/``convert``.
        TypeError: when ``metadata`` contains a value other than str, int, float, bool, None,
            tensors, and lists, tuples or dicts of them.
    """
    payload = quantization_header(model)
    payload["metadata"] = plain_value(dict(metadata or {}), "metadata")
    payload["state_dict"] = plain_state_dict(model.state_dict())

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path
