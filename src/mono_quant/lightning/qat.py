"""QAT schedule for the callback, and loading QAT checkpoints without a Trainer."""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

from mono_quant.config import QuantConfig
from mono_quant.transform.qat import QATSchedule, prepare_qat

CHECKPOINT_KEY = "mono_quant"

ModuleType = TypeVar("ModuleType", bound=pl.LightningModule)


def _check_epoch(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative epoch or step index or None.")


@dataclass(frozen=True)
class QATOptions:
    """When fake quantization starts and when observers and batch-norm statistics freeze.

    Epochs and steps count from 0, as ``trainer.current_epoch`` and ``trainer.global_step`` do.
    """

    learnable_scale: bool | None = None
    fold_bn: bool = True
    start_epoch: int = 0
    start_step: int | None = None
    freeze_observers_epoch: int | None = None
    freeze_bn_epoch: int | None = None

    def __post_init__(self) -> None:
        _check_epoch("qat_start_epoch", self.start_epoch)
        _check_epoch("qat_start_step", self.start_step)
        _check_epoch("freeze_observers_epoch", self.freeze_observers_epoch)
        _check_epoch("freeze_bn_epoch", self.freeze_bn_epoch)

    def schedule(self, epoch: int, step: int) -> QATSchedule:
        """Return the flags for the training step at ``epoch`` and global ``step``."""
        started = epoch >= self.start_epoch and (self.start_step is None or step >= self.start_step)
        observing = self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch
        freeze_bn = self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch
        return QATSchedule(fake_quant=started, observers=observing, freeze_bn=freeze_bn)

    def to_dict(self) -> dict[str, Any]:
        """Return the options as plain values, for checkpoints read with ``weights_only=True``."""
        # jsonargparse passes NonNegativeInt, an int subclass that weights-only loading rejects.
        return {
            key: int(value) if isinstance(value, int) and not isinstance(value, bool) else value
            for key, value in asdict(self).items()
        }


def _init_arguments(model_class: type, hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """Return the saved hyper-parameters that ``model_class.__init__`` accepts.

    LightningCLI adds bookkeeping entries such as ``_class_path`` and ``_instantiator``; they
    are dropped unless ``__init__`` takes ``**kwargs``.
    """
    parameters = inspect.signature(model_class.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {k: v for k, v in hyper_parameters.items() if not k.startswith("_")}
    names = {p.name for p in parameters}
    return {k: v for k, v in hyper_parameters.items() if k in names}


def load_qat_checkpoint(
    model_class: type[ModuleType],
    checkpoint_path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> ModuleType:
    """Rebuild a LightningModule trained with ``QuantizeCallback(mode="qat")`` from a checkpoint.

    The checkpoint is read with ``torch.load(weights_only=True)``. The model is built from the
    saved hyper-parameters (overridden by ``model_kwargs``), fake-quantized with the config the
    callback stored, and loaded strictly, so it continues exactly where training stopped.

    Raises:
        ValueError: when the checkpoint was not written during a QAT run.
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    stored = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(stored, dict) or stored.get("mode") != "qat":
        raise ValueError(
            f"{checkpoint_path} contains no mono_quant QAT state; it was not written by a Trainer "
            "with QuantizeCallback(mode='qat'). Load a float checkpoint with "
            f"{model_class.__name__}.load_from_checkpoint instead."
        )
    hyper_parameters = _init_arguments(model_class, checkpoint.get("hyper_parameters") or {})
    model = model_class(**{**hyper_parameters, **model_kwargs})

    config = QuantConfig(**stored["config"])
    options = QATOptions(**stored["options"])
    prepare_qat(model, config, learnable_scale=options.learnable_scale, fold_bn=options.fold_bn)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model
