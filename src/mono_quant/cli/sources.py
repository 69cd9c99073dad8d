"""Build the float model, its weights and the data module that a command names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from torch import nn

from mono_quant.io import ARTIFACT_FORMAT, load_weights_only, quantized_layer_names


def checkpoint_hyperparameters(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Return the constructor arguments that Lightning saved with ``save_hyperparameters``.

    Keys that start with ``_`` (Lightning's instantiator and class path records) are dropped,
    because they are not constructor arguments.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    if not isinstance(saved, Mapping):
        return {}
    return {str(key): value for key, value in saved.items() if not str(key).startswith("_")}


def merge_checkpoint_arguments(
    model_config: Namespace, explicit: set[str], checkpoint: Mapping[str, Any]
) -> None:
    """Fill ``model_config.init_args`` from the checkpoint's hyper-parameters, in place.

    Arguments named in ``explicit`` (given on the command line or in a config file) keep their
    value, so the precedence matches ``load_from_checkpoint(path, **kwargs)``.
    """
    init_args = model_config.get("init_args")
    if init_args is None:
        return
    for key, value in checkpoint_hyperparameters(checkpoint).items():
        if key in init_args and key not in explicit:
            init_args[key] = value


def read_float_state_dict(path: str) -> dict[str, Any]:
    """Return the float ``state_dict`` stored at ``path`` by ``torch.save(model.state_dict())``.

    Raises:
        ValueError: when the file contains pickled objects, a mono-quant file, a Lightning
            checkpoint, quantized layers, or anything other than a mapping of tensors.
    """
    state = load_weights_only(path, "state_dict file")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} contains a {type(state).__name__}, not a state_dict; write it with "
            "torch.save(model.state_dict(), path)."
        )
    if state.get("format") == ARTIFACT_FORMAT:
        raise ValueError(
            f"{path} is a quantized mono-quant file, not a float state_dict; load it with "
            "mono_quant.load(path, model) or look at it with mono-quant inspect."
        )
    if "state_dict" in state and "pytorch-lightning_version" in state:
        raise ValueError(f"{path} is a Lightning checkpoint; pass it as --ckpt_path instead.")
    quantized = quantized_layer_names(state)
    if quantized:
        raise ValueError(
            f"{path} contains quantized layers {quantized[:3]}, which a float model cannot load; "
            "use mono_quant.load(path, model) on files written by mono_quant.save."
        )
    return dict(state)


def load_float_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Copy ``state_dict`` into ``model`` strictly, with an error that lists what differs.

    Raises:
        ValueError: when keys are missing or unexpected or a tensor has another shape.
    """
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}; pass the --model class (and init_args) that "
            "wrote it."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise ValueError(
            f"{source} does not fit {type(model).__name__} ({details}); pass the --model "
            "init_args that the checkpoint was trained with."
        ) from None


def check_weight_source(ckpt_path: str | None, state_dict: str | None, required: bool) -> None:
    """Raise ``ValueError`` unless at most one weight file is given, and one when required."""
    if ckpt_path is not None and state_dict is not None:
        raise ValueError("pass either --ckpt_path or --state_dict, not both.")
    if required and ckpt_path is None and state_dict is None:
        raise ValueError(
            "no float weights given; pass --ckpt_path (a Lightning checkpoint) or --state_dict "
            "(a file written by torch.save(model.state_dict()))."
        )


def prepare_data(data: pl.LightningDataModule, split: str) -> tuple[Any, Any]:
    """Set ``data`` up and return its training loader and the loader of ``split``.

    ``split`` is ``"val"`` or ``"test"``. The training loader is ``None`` when the data module
    has none, and the evaluation loader falls back to the training one when ``split`` has none.
    """
    data.prepare_data()
    data.setup("fit")
    if split == "test":
        data.setup("test")
    train = _loader(data, "train_dataloader")
    evaluation = _loader(data, f"{split}_dataloader")
    if evaluation is None:
        evaluation = train
    if evaluation is None:
        raise ValueError(
            f"{type(data).__name__} returns neither a {split} nor a train dataloader; implement "
            f"{split}_dataloader()."
        )
    return train, evaluation


def _loader(data: pl.LightningDataModule, method: str) -> Any:
    # LightningDataModule's default *_dataloader methods raise MisconfigurationException (a
    # subclass of Exception) when the user did not implement them.
    if not _overrides(data, method):
        return None
    loader = getattr(data, method)()
    if isinstance(loader, (list, tuple)):
        return loader[0] if loader else None
    if isinstance(loader, Mapping):
        return next(iter(loader.values()), None)
    return loader


def _overrides(data: pl.LightningDataModule, method: str) -> bool:
    implementation = getattr(type(data), method, None)
    base = getattr(pl.LightningDataModule, method, None)
    return implementation is not None and implementation is not base


def example_batch(loader: Any) -> tuple[Any, ...]:
    """Return the model inputs of the first batch of ``loader`` as positional arguments."""
    from mono_quant.transform.batches import split_batch

    for batch in loader:
        inputs, _ = split_batch(batch)
        return inputs if isinstance(inputs, tuple) else (inputs,)
    raise ValueError("the dataloader yielded no batch to take example inputs from.")


def batch_dynamic_shapes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Return ``dynamic_shapes`` that let dimension 0 of every input tensor vary."""
    dynamic = torch.export.Dim.AUTO
    return tuple({0: dynamic} if isinstance(arg, torch.Tensor) else None for arg in args)


def check_output_path(path: str, option: str) -> Path:
    """Return ``path`` as a ``Path``; raise ``ValueError`` when it names a directory."""
    output = Path(path)
    if output.is_dir():
        raise ValueError(f"{option} {path} is a directory; pass a file name such as model.pt.")
    return output
