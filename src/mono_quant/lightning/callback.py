"""``QuantizeCallback``: post-training quantization at the end of ``Trainer.fit``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from rich.console import Console
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from mono_quant.config import QuantConfig
from mono_quant.evaluate import ComparisonReport, compare
from mono_quant.io import save
from mono_quant.transform import QuantizationReport, quantization_report, quantize


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

    After fit, ``quantized_model`` holds the quantized LightningModule, ``report`` the
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
        calibration_batches: number of training batches used for calibration.
        metrics: torchmetrics metric or collection applied to ``(output, target)``; by default
            top-1 accuracy for classification outputs with integer targets.
        save_dir: folder for the quantized model file; default the trainer's ``log_dir``.
        save_model: write the quantized model file at fit end.
        verbose: print the comparison table on rank zero.

    Figures are logged as ``quant/<name>``; with several ``QuantizeCallback`` in one trainer each
    logs under ``quant/<config>/<name>``, for example ``quant/w4-weight-only-per-group-32/``.
    """

    def __init__(
        self,
        bits: Literal[2, 3, 4, 5, 6, 7, 8, 16] = 8,
        mode: Literal["ptq"] = "ptq",
        activations: Literal["auto", "static", "dynamic"] | None = "auto",
        granularity: Literal["auto", "per_tensor", "per_channel", "per_group"] = "auto",
        group_size: PositiveInt | None = None,
        symmetric: bool = True,
        observer: str = "minmax",
        weight_observer: str = "minmax",
        dtype: Literal["auto", "int", "float16", "bfloat16"] = "auto",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        calibration_batches: PositiveInt = 32,
        metrics: Metric | MetricCollection | None = None,
        save_dir: str | None = None,
        save_model: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if mode != "ptq":
            raise ValueError(f"mode={mode!r} is not supported; use mode='ptq'.")
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
        )
        self.mode = mode
        self.calibration_batches = calibration_batches
        self.metrics = metrics
        self.save_dir = save_dir
        self.save_model = save_model
        self.verbose = verbose

        self.quantized_model: pl.LightningModule | None = None
        self.report: ComparisonReport | None = None
        self.layer_report: QuantizationReport | None = None
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
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:
            rank_zero_warn("fit was interrupted, so mono_quant skips quantization.")
            return
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
        quantized = quantize(
            pl_module,
            self.config,
            calibration_data=calibration_loader,
            calibration_batches=self.calibration_batches,
        )
        self.quantized_model = quantized  # type: ignore[assignment]
        self.layer_report = quantization_report(quantized)

        eval_loader = _first_loader(trainer.val_dataloaders, "validation")
        if eval_loader is None:
            rank_zero_warn(
                "No validation dataloader: mono_quant compares float and quantized models on "
                "training batches instead."
            )
            eval_loader = calibration_loader
        metrics = self.metrics.clone() if self.metrics is not None else None
        self.report = compare(pl_module, quantized, eval_loader, metrics=metrics)
        self.report.title = f"float vs {self.config.label}"
        self._fits_completed += 1

        self._log_figures(trainer)
        self._save(trainer)
        self._print_report()

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
        float_layers = self.layer_report.float_layers
        if float_layers:
            reasons = "; ".join(f"{row.name}: {row.reason}" for row in float_layers)
            console.print(f"Layers kept in float: {reasons}")
