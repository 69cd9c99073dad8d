"""Lightning checkpoints of quantized modules: write the layout, rebuild the layers on load.

A checkpoint of a quantized LightningModule contains integer codes and qparams under the names of
the original float layers. ``load_from_checkpoint`` builds a float module first, so the
quantized layers must be rebuilt before Lightning copies the state in. The
:class:`QuantizedCheckpointMixin` does both halves through the module's checkpoint hooks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from torch import nn

from mono_quant.io.load import quantized_layer_names, rebuild_quantized_layers
from mono_quant.io.read import load_weights_only
from mono_quant.io.save import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    plain_state_dict,
    quantization_header,
)
from mono_quant.transform.state import get_state

# The QAT callback stores its fake-quant state under "mono_quant"; converted layouts use their
# own key so that the two never overwrite each other.
QUANTIZED_CHECKPOINT_KEY = "mono_quant_quantized"
QAT_CHECKPOINT_KEY = "mono_quant"


def add_quantization_layout(checkpoint: MutableMapping[str, Any], pl_module: nn.Module) -> None:
    """Store the quantization header of ``pl_module`` in ``checkpoint`` if it is quantized.

    Call it from ``on_save_checkpoint``. The layers' layouts in ``checkpoint["state_dict"]``
    are turned into plain values, so ``torch.load(weights_only=True)`` reads the checkpoint.
    Float and QAT-prepared modules leave the checkpoint unchanged.
    """
    state = get_state(pl_module)
    if state is None or state.report is None:
        return
    checkpoint[QUANTIZED_CHECKPOINT_KEY] = quantization_header(pl_module)
    if isinstance(checkpoint.get("state_dict"), MutableMapping):
        plain_state_dict(checkpoint["state_dict"])


def restore_quantized_layers(pl_module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Rebuild, in place, the quantized layers of the module a checkpoint was written from.

    Call it from ``on_load_checkpoint``: Lightning calls that hook on a freshly built float
    module, both in ``load_from_checkpoint`` and in ``trainer.test(ckpt_path=...)``, and copies
    ``checkpoint["state_dict"]`` in afterwards. A checkpoint without a quantization layout
    leaves the module unchanged, and so does a module that is already quantized.

    Raises:
        ValueError: when the layout is from a newer format version, the checkpoint contains
            quantized layers but no layout, or the module's architecture differs.
    """
    header = checkpoint.get(QUANTIZED_CHECKPOINT_KEY)
    state_dict = checkpoint.get("state_dict") or {}
    if header is None:
        quantized = quantized_layer_names(state_dict)
        if quantized and get_state(pl_module) is None:
            raise ValueError(
                f"the checkpoint contains quantized layers {quantized[:3]} but no quantization "
                f"layout; it was saved without {QUANTIZED_CHECKPOINT_KEY!r}. Save quantized "
                "models with mono_quant.save and load them with mono_quant.load."
            )
        return
    state = get_state(pl_module)
    if state is not None and state.report is not None:
        return
    if not isinstance(header, Mapping) or header.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"the checkpoint's {QUANTIZED_CHECKPOINT_KEY!r} entry is not a mono-quant layout."
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ValueError(
            f"the checkpoint's quantization layout has format_version {version!r}, newer than "
            f"this mono_quant reads ({ARTIFACT_VERSION}); upgrade mono_quant."
        )
    rebuild_quantized_layers(pl_module, header, state_dict)


class QuantizedCheckpointMixin:
    """LightningModule mixin whose checkpoints restore quantized layers on load.

    Put it before ``LightningModule`` in the bases::

        class MyModel(QuantizedCheckpointMixin, L.LightningModule): ...

    A checkpoint written while the module is quantized (for example ``trainer.save_checkpoint``
    after ``trainer.test(callback.quantized_model)``) then restores with
    ``MyModel.load_from_checkpoint(path)`` and with ``trainer.test(MyModel(), ckpt_path=path)``.
    Float checkpoints load as before.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        add_quantization_layout(checkpoint, self)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        restore_quantized_layers(self, checkpoint)  # type: ignore[arg-type]


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a float Lightning checkpoint read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a readable checkpoint, contains pickled objects, is a
            mono-quant file, or contains quantized or QAT state (each case names the loader to
            use instead).
    """
    checkpoint = load_weights_only(path, "Lightning checkpoint")
    if isinstance(checkpoint, Mapping) and checkpoint.get("format") == ARTIFACT_FORMAT:
        raise ValueError(
            f"{path} is a quantized mono-quant file, not a float checkpoint; load it with "
            "mono_quant.load(path, model) or look at it with mono-quant inspect."
        )
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(
            f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry. For a file "
            "written with torch.save(model.state_dict()), pass --state_dict instead."
        )
    qat = checkpoint.get(QAT_CHECKPOINT_KEY)
    if isinstance(qat, Mapping) and qat.get("mode") == "qat":
        raise ValueError(
            f"{path} was written during QAT and contains fake-quant state; rebuild it with "
            "mono_quant.lightning.qat.load_qat_checkpoint instead."
        )
    quantized = quantized_layer_names(checkpoint["state_dict"])
    if QUANTIZED_CHECKPOINT_KEY in checkpoint or quantized:
        raise ValueError(
            f"{path} contains an already quantized model (layers {quantized[:3]}); restore it with "
            "load_from_checkpoint on a model with QuantizedCheckpointMixin, or save it with "
            "mono_quant.save and load it with mono_quant.load."
        )
    return dict(checkpoint)
