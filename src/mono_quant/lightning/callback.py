"""``QuantizeCallback``: post-training quantization at the end of ``Trainer.fit``."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from rich.console import Console
from torch import nn
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from mono_quant.config import QuantConfig
from mono_quant.evaluate import BudgetReport, ComparisonReport, compare, quantize_with_budget
from mono_quant.evaluate.monitor import (
    check_max_metric_drop,
    expected_metric_names,
    resolve_monitor,
)
from mono_quant.io import save
from mono_quant.lightning.qat import CHECKPOINT_KEY, QATOptions
from mono_quant.transform import QuantizationReport, quantization_report, quantize
from mono_quant.transform.qat import (
    QATSchedule,
    apply_schedule,
    convert_qat,
    fake_quant_bytes,
    prepare_qat,
)
from mono_quant.transform.state import get_state


def _first_loader(loaders: Any, role: str) -> Any:
    """Return one dataloader out of what ``trainer.*_dataloader(s)`` holds."""
    if isinstance(loaders, dict):
        if len(loaders) > 1:
            rank_zero_warn(f"{len(loaders)} {role} dataloaders found; mono_quant uses the first.")
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        if len(loaders) > 1:
            rank_zero_warn(f"{len(loaders)} {role} dataloaders found; mono_quant uses the first.")
        return loaders[0] if loaders else None
    return loaders


class QuantizeCallback(Callback):
    """Quantize the trained model at the end of ``fit`` and compare it with the float model.

    At fit end the callback calibrates a copy of the LightningModule on training batches (eval
    mode, no gradients) and converts it. It then compares float and quantized outputs on the
    validation dataloader with torchmetrics, logs the figures under ``quant/`` to the trainer's
    loggers, prints one table on rank zero and saves the quantized model. The float model stays the
    trainer's model, so ``trainer.test``, checkpoints and a second ``fit`` are unaffected.

    After fit, ``quantized_model`` is the quantized LightningModule, ``report`` the
    :class:`~mono_quant.ComparisonReport` and ``layer_report`` the per-layer outcome.

    Args:
        bits: weight width: 8 means W8A8 (static int8 activations), 2 to 7 weight-only
            per-group int, 16 a float16 cast.
        mode: ``"ptq"``: post-training quantization at fit end.
        activations: ``"static"``, ``"dynamic"``, ``None`` (weight-only) or ``"auto"`` (from bits).
        granularity: ``"per_tensor"``, ``"per_channel"``, ``"per_group"`` or ``"auto"``.
        group_size: weights per group with ``per_group`` granularity (default 32).
        symmetric: symmetric weight grid (zero_point 0) or affine.
        observer: activation range observer: ``minmax``, ``moving_average``,
            ``percentile`` or ``mse``.
        weight_observer: weight range observer, from the same names.
        dtype: ``"auto"``, ``"int"``, ``"float16"`` or ``"bfloat16"``.
        include: name globs or class names of the layers to quantize (default: all supported).
        exclude: name globs or class names of layers to keep in float.
        parameters: qualified names or globs of parameters that custom modules use through
            functional calls, to store weight-only (for example ``["block.proj_weight"]``).
        calibration_batches: number of training batches used for calibration.
        metrics: torchmetrics metric or collection applied to ``(output, target)``; by default
            top-1 accuracy for classification outputs with integer targets.
        max_metric_drop: PTQ only: the largest allowed drop of ``monitor`` on the validation
            data, in the metric's units (0.01 is one accuracy point). Layers then move to wider
            formats (int8, then float), most sensitive first, until the drop fits.
        monitor: the metric the budget holds: a name from ``metrics`` or a unique prefix of
            one (``"acc"`` for the default ``accuracy``); default the first metric.
        save_dir: folder for the quantized model file; default the trainer's ``log_dir``.
        save_model: write the quantized model file at fit end.
        verbose: print the comparison table on rank zero.
        learnable_scale: QAT only: learn weight scales (LSQ); ``None`` learns them at 4 bits
            and below.
        fold_bn: QAT only: train ``Conv`` + ``BatchNorm`` pairs inside an ``nn.Sequential``
            with the batch norm folded into the quantized weight.
        qat_start_epoch: QAT only: epoch from which fake quantization is applied; observers
            record ranges before it.
        qat_start_step: QAT only: global step from which fake quantization is applied.
        freeze_observers_epoch: QAT only: epoch from which activation ranges and non-learned
            weight scales stop changing.
        freeze_bn_epoch: QAT only: epoch from which batch norms use and keep their running stats.

    Figures are logged as ``quant/<name>``; with several ``QuantizeCallback`` in one trainer each
    logs under ``quant/<config>/<name>``, for example ``quant/w4-weight-only-per-group-32/``.
    """

    def __init__(
        self,
        bits: Literal[2, 3, 4, 5, 6, 7, 8, 16] = 8,
        mode: Literal["ptq", "qat"] = "ptq",
        activations: Literal["auto", "static", "dynamic"] | None = "auto",
        granularity: Literal["auto", "per_tensor", "per_channel", "per_group"] = "auto",
        group_size: PositiveInt | None = None,
        symmetric: bool = True,
        observer: str = "minmax",
        weight_observer: str = "minmax",
        dtype: Literal["auto", "int", "float16", "bfloat16"] = "auto",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        parameters: list[str] | None = None,
        calibration_batches: PositiveInt = 32,
        metrics: Metric | MetricCollection | None = None,
        max_metric_drop: NonNegativeFloat | None = None,
        monitor: str | None = None,
        save_dir: str | None = None,
        save_model: bool = True,
        verbose: bool = True,
        learnable_scale: bool | None = None,
        fold_bn: bool = True,
        qat_start_epoch: NonNegativeInt = 0,
        qat_start_step: NonNegativeInt | None = None,
        freeze_observers_epoch: NonNegativeInt | None = None,
        freeze_bn_epoch: NonNegativeInt | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("ptq", "qat"):
            raise ValueError(f"mode={mode!r} is not supported; use mode='ptq' or mode='qat'.")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int):
            raise TypeError(f"calibration_batches must be an int, got {calibration_batches!r}.")
        if calibration_batches <= 0:
            raise ValueError(
                f"calibration_batches={calibration_batches} must be a positive number of "
                "training batches; the default is 32."
            )
        if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
            raise TypeError(
                f"metrics must be a torchmetrics Metric or MetricCollection, got "
                f"{type(metrics).__name__}."
            )

        self.config = QuantConfig(
            bits=bits,
            activations=activations,
            granularity=granularity,
            group_size=group_size,
            symmetric=symmetric,
            observer=observer,
            weight_observer=weight_observer,
            dtype=dtype,
            include=tuple(include) if include is not None else None,
            exclude=tuple(exclude) if exclude is not None else None,
            parameters=tuple(parameters) if parameters is not None else None,
        )
        self.qat_options = QATOptions(
            learnable_scale=learnable_scale,
            fold_bn=fold_bn,
            start_epoch=qat_start_epoch,
            start_step=qat_start_step,
            freeze_observers_epoch=freeze_observers_epoch,
            freeze_bn_epoch=freeze_bn_epoch,
        )
        if max_metric_drop is not None:
            check_max_metric_drop(max_metric_drop)
            # Checked now, so a typo fails before training rather than at fit end.
            resolve_monitor(monitor, expected_metric_names(metrics))
            if mode == "qat":
                raise ValueError(
                    "max_metric_drop searches post-training formats, so it needs mode='ptq'; "
                    "for QAT drop max_metric_drop and choose the layers with exclude."
                )
        elif monitor is not None:
            raise ValueError(
                f"monitor={monitor!r} only applies to a metric budget; set max_metric_drop too, "
                "or drop monitor."
            )
        if mode == "qat" and not self.config.is_integer:
            raise ValueError(
                f"mode='qat' needs integer bits (2 to 8), got bits={bits}; 16-bit float casts "
                "need no training, so use mode='ptq'."
            )
        self.mode = mode
        self.calibration_batches = calibration_batches
        self.metrics = metrics
        # float() drops jsonargparse's NonNegativeFloat, which weights-only loading rejects.
        self.max_metric_drop = None if max_metric_drop is None else float(max_metric_drop)
        self.monitor = monitor
        self.save_dir = save_dir
        self.save_model = save_model
        self.verbose = verbose

        self.quantized_model: pl.LightningModule | None = None
        self.report: ComparisonReport | None = None
        self.fake_quant_report: ComparisonReport | None = None
        self.layer_report: QuantizationReport | None = None
        self.budget_report: BudgetReport | None = None
        self.saved_path: Path | None = None
        self._fits_completed = 0

    @property
    @override
    def state_key(self) -> str:
        # Several callbacks with different configs can sit in one Trainer.
        return self._generate_state_key(config=self.config.label)

    @property
    def _slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.config.label.lower()).strip("-")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before checkpoint weights are restored and before optimizers and DDP are set up,
        # so a resumed run loads its fake-quant state strictly and trains the same Parameters.
        # Every stage prepares a float model, so test/validate/predict with a QAT checkpoint
        # also load strictly.
        if self.mode != "qat":
            return
        state = get_state(pl_module)
        if state is None:
            options = self.qat_options
            prepare_qat(pl_module, self.config, options.learnable_scale, options.fold_bn)
        elif state.mode != "qat":
            # A quantized model, such as callback.quantized_model, is what test, validate and
            # predict should run as it is.
            if stage != "fit":
                return
            stage_done = (
                "converted to integer layers" if state.report is not None else "prepared for PTQ"
            )
            raise ValueError(
                f"{type(pl_module).__name__} was already {stage_done}, and QAT training needs the "
                "float model: pass the float LightningModule to trainer.fit, or evaluate this "
                "one with trainer.test or trainer.validate."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "qat":
            schedule = self.qat_options.schedule(trainer.current_epoch, trainer.global_step)
            apply_schedule(pl_module, schedule)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.mode == "qat":
            checkpoint[CHECKPOINT_KEY] = {
                "mode": "qat",
                "config": self.config.to_dict(),
                "options": self.qat_options.to_dict(),
            }

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            rank_zero_warn("fit was interrupted, so mono_quant skips quantization.")
            return
        if self.mode == "qat":
            self._convert_qat_and_compare(trainer, pl_module)
        else:
            self._quantize_and_compare(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fits_completed": self._fits_completed, "config": self.config.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fits_completed = int(state_dict.get("fits_completed", 0))

    def _quantize_and_compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        calibration_loader = _first_loader(trainer.train_dataloader, "training")
        if calibration_loader is None:
            raise ValueError(
                "QuantizeCallback found no training dataloader to calibrate on; pass train data "
                "to trainer.fit."
            )
        if self.max_metric_drop is not None:
            quantized = self._quantize_within_budget(trainer, pl_module, calibration_loader)
        else:
            quantized = quantize(
                pl_module,
                self.config,
                calibration_data=calibration_loader,
                calibration_batches=self.calibration_batches,
            )
        self._compare_and_report(trainer, pl_module, quantized, f"float vs {self.config.label}")

    def _quantize_within_budget(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, calibration_loader: Any
    ) -> nn.Module:
        assert self.max_metric_drop is not None
        quantized, self.budget_report = quantize_with_budget(
            pl_module,
            self.config,
            calibration_loader if self.config.needs_calibration else None,
            self._eval_loader(trainer),
            self.max_metric_drop,
            metrics=self._fresh_metrics(),
            monitor=self.monitor,
            calibration_batches=self.calibration_batches,
            # Metrics are synced across processes, but the SQNR tie-break of the ranking is
            # not, so every process follows rank zero's ranking to build the same models.
            broadcast=trainer.strategy.broadcast,
        )
        return quantized

    def _eval_loader(self, trainer: pl.Trainer) -> Any:
        eval_loader = _first_loader(trainer.val_dataloaders, "validation")
        if eval_loader is None:
            rank_zero_warn(
                "No validation dataloader: mono_quant compares float and quantized models on "
                "training batches instead."
            )
            eval_loader = _first_loader(trainer.train_dataloader, "training")
        return eval_loader

    def _convert_qat_and_compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantized = convert_qat(pl_module)

        # The float reference is the trained model with fake quantization switched off.
        float_model = copy.deepcopy(pl_module)
        apply_schedule(float_model, QATSchedule(fake_quant=False, observers=False))
        self._compare_and_report(
            trainer, float_model, quantized, f"float vs {self.config.label} (QAT)", pl_module
        )
        assert self.report is not None
        # The float reference still carries its quantizers; count only what a float model holds.
        self.report.float_size_bytes -= fake_quant_bytes(float_model)

    def _compare_and_report(
        self,
        trainer: pl.Trainer,
        float_model: pl.LightningModule,
        quantized: nn.Module,
        title: str,
        fake_quant_model: pl.LightningModule | None = None,
    ) -> None:
        # The deep copy keeps Lightning's cache of metric attributes, which points at the float
        # model's metric objects, so trainer.test(quantized_model) could not log them.
        if hasattr(quantized, "_metric_attributes"):
            quantized._metric_attributes = None
        # The quantized copy serves inference; a copy taken during fit starts in training mode,
        # where Dropout would be active and int8 chains would not run.
        quantized.eval()
        self.quantized_model = quantized  # type: ignore[assignment]
        self.layer_report = quantization_report(quantized)

        eval_loader = self._eval_loader(trainer)
        self.report = compare(float_model, quantized, eval_loader, metrics=self._fresh_metrics())
        self.report.title = title
        if fake_quant_model is not None:
            self.fake_quant_report = compare(
                fake_quant_model, quantized, eval_loader, metrics=self._fresh_metrics()
            )
            self.fake_quant_report.title = "fake-quant vs converted"
            self.fake_quant_report.reference_label = "fake-quant"
        self._fits_completed += 1

        self._log_figures(trainer)
        self._save(trainer)
        self._print_report()

    def _fresh_metrics(self) -> Metric | MetricCollection | None:
        return self.metrics.clone() if self.metrics is not None else None

    @rank_zero_only
    def _log_figures(self, trainer: pl.Trainer) -> None:
        assert self.report is not None and self.layer_report is not None
        figures = {**self.report.summary(), **self.layer_report.summary()}
        prefix = "quant/"
        if sum(isinstance(c, QuantizeCallback) for c in trainer.callbacks) > 1:
            # Several quantize callbacks log at the same step, so each gets its own namespace.
            prefix = f"quant/{self._slug}/"
        numeric = {
            f"{prefix}{key}": float(value)
            for key, value in figures.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self.fake_quant_report is not None:
            for key, value in self.fake_quant_report.summary().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numeric[f"{prefix}fake_quant/{key}"] = float(value)
        if self.budget_report is not None:
            budget = self.budget_report
            numeric.update(
                {
                    f"{prefix}budget/met": float(budget.met),
                    f"{prefix}budget/drop": budget.drop,
                    f"{prefix}budget/max_metric_drop": budget.max_metric_drop,
                    f"{prefix}budget/base_drop": budget.base_drop,
                    f"{prefix}budget/metric": budget.metric,
                    f"{prefix}budget/layers_widened": float(len(budget.moved)),
                    f"{prefix}budget/size_ratio": budget.size_ratio,
                    f"{prefix}budget/evaluations": float(budget.evaluations),
                }
            )
        for logger in trainer.loggers:
            logger.log_metrics(numeric, step=trainer.global_step)
            logger.save()

    def _save(self, trainer: pl.Trainer) -> None:
        if not self.save_model:
            return
        folder = Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)
        path = folder / f"quantized-{self._slug}.pt"
        if trainer.is_global_zero:
            assert self.quantized_model is not None
            self.saved_path = save(self.quantized_model, path)
            rank_zero_info(f"mono_quant saved the quantized model to {path}")
        trainer.strategy.barrier("mono_quant_save")

    @rank_zero_only
    def _print_report(self) -> None:
        if not self.verbose:
            return
        assert self.report is not None and self.layer_report is not None
        console = Console()
        console.print(self.report.table())
        if self.fake_quant_report is not None:
            console.print(self.fake_quant_report.table())
        if self.budget_report is not None:
            console.print(self.budget_report.table())
        float_layers = self.layer_report.float_layers
        if float_layers:
            reasons = "; ".join(f"{row.name}: {row.reason}" for row in float_layers)
            console.print(f"Layers kept in float: {reasons}")
