"""QuantizeCallback(max_metric_drop=...): the metric budget inside a real fit on the digits."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.digits.data import DigitsDataModule
from mono_quant.lightning import QuantizeCallback

BUDGET = 0.02


class DigitsMLP(L.LightningModule):
    """Two linear layers over the 8x8 digits; trains in about a second."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path: Path, callback: QuantizeCallback) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        callbacks=[callback],
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(DigitsMLP(), datamodule=DigitsDataModule())
    return trainer


def test_budget_holds_at_fit_end(tmp_path: Path, capsys) -> None:
    callback = QuantizeCallback(
        bits=2, granularity="per_tensor", max_metric_drop=BUDGET, monitor="acc", save_model=False
    )

    trainer = _fit(tmp_path, callback)

    budget = callback.budget_report
    assert budget.monitor == "accuracy"
    assert budget.base_drop > BUDGET, "2-bit everywhere should need the budget search"
    assert budget.met, str(budget)
    assert budget.drop <= BUDGET + 1e-9
    # The comparison the callback reports is the same validation run the search accepted.
    summary = callback.report.summary()
    assert -summary["delta/accuracy"] == pytest.approx(budget.drop)
    assert {move.name for move in budget.moved} <= {"net.1", "net.3"}
    assert "metric budget met" in capsys.readouterr().out
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        logged = set(next(csv.reader(file)))
    assert {"quant/budget/met", "quant/budget/drop", "quant/budget/layers_widened"} <= logged


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_metric_drop": -0.5}, ValueError, "at least 0"),
        ({"max_metric_drop": 0.01, "mode": "qat"}, ValueError, "needs mode='ptq'"),
        ({"monitor": "acc"}, ValueError, "only applies to a metric budget"),
    ],
    ids=["negative", "qat", "monitor-alone"],
)
def test_bad_budget_options(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        QuantizeCallback(bits=4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_metric_drop": 0.01, "monitor": "f1"}, "not one of the computed metrics"),
        ({"max_metric_drop": float("nan")}, "finite number"),
        ({"max_metric_drop": float("inf")}, "finite number"),
        ({"max_metric_drop": 0.01, "monitor": ""}, "non-empty metric name"),
    ],
    ids=["unknown-monitor", "nan", "inf", "empty-monitor"],
)
def test_budget_options_fail_before_training(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(bits=4, **kwargs)
