"""QuantizeCallback in real Lightning loops on the digits data."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN
from mono_quant.lightning import QuantizeCallback
from mono_quant.nn import QuantizedLayer


class TinyDigits(L.LightningModule):
    """A small MLP over the 8x8 digits, enough to train in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def _unpack(batch):
        return (batch["input"], batch["target"]) if isinstance(batch, dict) else batch

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DictBatches(DigitsDataModule):
    """The digits data with batches as mappings instead of tuples."""

    @staticmethod
    def _to_dicts(loader):
        loader.collate_fn = lambda items: {
            "input": torch.stack([x for x, _ in items]),
            "target": torch.stack([y for _, y in items]),
        }
        return loader

    def train_dataloader(self):
        return self._to_dicts(super().train_dataloader())

    def val_dataloader(self):
        return self._to_dicts(super().val_dataloader())


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "logger": CSVLogger(tmp_path, name="logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **options)


def _fit(tmp_path: Path, callback: QuantizeCallback, datamodule=None, **kwargs):
    L.seed_everything(0, verbose=False)
    model = TinyDigits()
    trainer = _trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule())
    return trainer, model


def _logged_metrics(trainer: L.Trainer) -> set[str]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        return set(next(csv.reader(file)))


def test_default_callback_quantizes_at_fit_end(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)

    trainer, model = _fit(tmp_path, callback)

    assert isinstance(callback.quantized_model.net[1], QuantizedLayer)
    assert callback.quantized_model.net[1].activations == "static"
    assert not callback.quantized_model.training, "the quantized copy serves inference"
    assert type(model.net[1]) is nn.Linear, "the trainer's model must stay float"
    assert trainer.lightning_module is model
    summary = callback.report.summary()
    assert abs(summary["delta/accuracy"]) <= 0.02, summary
    assert summary["size/ratio"] < 0.3


def test_callback_logs_quant_figures(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)

    trainer, _ = _fit(tmp_path, callback)

    logged = _logged_metrics(trainer)
    assert "quant/float/accuracy" in logged
    assert "quant/quantized/accuracy" in logged
    assert "quant/size/ratio" in logged


def test_callback_saves_weights_only_artifact(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=4, save_dir=str(tmp_path / "out"), verbose=False)

    _fit(tmp_path, callback)

    artifact = torch.load(callback.saved_path, weights_only=True)
    assert callback.saved_path.parent == tmp_path / "out"
    assert artifact["format"] == "mono-quant"
    assert artifact["config"]["bits"] == 4
    assert artifact["state_dict"]["net.1.weight_codes"].dtype == torch.uint8


def test_quantized_model_runs_in_trainer_test(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)
    trainer, _ = _fit(tmp_path, callback)

    results = trainer.test(callback.quantized_model, datamodule=DigitsDataModule(), verbose=False)

    assert results[0]["test_acc"] >= callback.report.float_metrics["accuracy"] - 0.05


def test_float_checkpoint_and_second_fit_still_work(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    L.seed_everything(0, verbose=False)
    model = TinyDigits()
    trainer = _trainer(tmp_path, [callback, checkpoint])
    trainer.fit(model, datamodule=DigitsDataModule())

    tested = trainer.test(ckpt_path="best", datamodule=DigitsDataModule(), verbose=False)
    second = _trainer(tmp_path, [QuantizeCallback(bits=8, verbose=False)], max_epochs=1)
    second.fit(model, datamodule=DigitsDataModule())

    assert tested[0]["test_acc"] > 0.5
    assert type(model.net[1]) is nn.Linear


def test_two_callbacks_with_different_configs(tmp_path: Path) -> None:
    int8 = QuantizeCallback(bits=8, verbose=False)
    int4 = QuantizeCallback(bits=4, verbose=False)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [int8, int4])

    trainer.fit(TinyDigits(), datamodule=DigitsDataModule())

    assert int8.state_key != int4.state_key
    assert int8.quantized_model.net[1].weight_spec.bits == 8
    assert int4.quantized_model.net[1].weight_spec.bits == 4
    logged = _logged_metrics(trainer)
    assert "quant/w8a8-static-per-channel/quantized/accuracy" in logged
    assert "quant/w4-weight-only-per-group-32/quantized/accuracy" in logged


def test_mapping_batches(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)

    _fit(tmp_path, callback, datamodule=DictBatches())

    assert callback.report.num_samples > 0
    assert "accuracy" in callback.report.quantized_metrics


def test_metric_collection_argument(tmp_path: Path) -> None:
    metrics = MetricCollection(
        {"acc": MulticlassAccuracy(num_classes=10), "f1": MulticlassF1Score(num_classes=10)}
    )
    callback = QuantizeCallback(bits=8, metrics=metrics, verbose=False)

    _fit(tmp_path, callback)

    assert set(callback.report.quantized_metrics) == {"acc", "f1"}


def test_no_validation_data_compares_on_training_batches(tmp_path: Path) -> None:
    callback = QuantizeCallback(bits=8, verbose=False)
    L.seed_everything(0, verbose=False)
    datamodule = DigitsDataModule()
    datamodule.setup("fit")
    trainer = _trainer(tmp_path, [callback], limit_val_batches=0)

    with pytest.warns(UserWarning, match="training batches instead"):
        trainer.fit(TinyDigits(), train_dataloaders=datamodule.train_dataloader())

    assert callback.report.num_samples > 0


def test_verbose_callback_prints_table(tmp_path: Path, capsys) -> None:
    _fit(tmp_path, QuantizeCallback(bits=8))

    printed = capsys.readouterr().out
    assert "float vs w8a8" in printed
    assert "accuracy" in printed


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bits": 9}, ValueError, "bits=9 is not supported"),
        ({"calibration_batches": 0}, ValueError, "calibration_batches=0 must be a positive number"),
        ({"metrics": "accuracy"}, TypeError, "torchmetrics Metric or MetricCollection"),
        ({"mode": "int8"}, ValueError, "mode='int8' is not supported"),
        ({"granularity": "per-channel"}, ValueError, "granularity='per-channel'"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        QuantizeCallback(**kwargs)


def test_quantized_model_runs_trainer_test(tmp_path: Path) -> None:
    # DigitsCNN logs torchmetrics objects, which Lightning looks up by attribute on the module.
    callback = QuantizeCallback(bits=8, verbose=False, save_model=False)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [callback], limit_train_batches=4, limit_val_batches=2)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    results = trainer.test(callback.quantized_model, datamodule=DigitsDataModule(), verbose=False)

    assert 0.0 <= results[0]["test_acc"] <= 1.0
