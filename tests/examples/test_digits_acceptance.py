"""End-to-end PTQ on the digits CNN: accuracy and storage against the float model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN
from mono_quant.lightning import QuantizeCallback

EPOCHS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[QuantizeCallback, QuantizeCallback]:
    root: Path = tmp_path_factory.mktemp("digits")
    int8 = QuantizeCallback(bits=8, verbose=False, save_model=False)
    int4 = QuantizeCallback(bits=4, group_size=32, verbose=False, save_model=False)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        callbacks=[int8, int4],
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    return int8, int4


def test_float_model_is_trained(trained) -> None:
    int8, _ = trained

    assert int8.report.float_metrics["accuracy"] >= 0.94, int8.report.summary()


def test_w8a8_accuracy_within_half_point(trained) -> None:
    int8, _ = trained
    summary = int8.report.summary()

    assert int8.config.activations == "static"
    assert summary["delta/accuracy"] >= -0.005, summary


def test_int4_accuracy_within_one_point(trained) -> None:
    _, int4 = trained
    summary = int4.report.summary()

    assert summary["delta/accuracy"] >= -0.01, summary


@pytest.mark.parametrize(("index", "max_ratio"), [(0, 0.27), (1, 0.16)], ids=["int8", "int4"])
def test_quantized_layer_bytes_ratio(trained, index: int, max_ratio: float) -> None:
    summary = trained[index].layer_report.summary()

    assert summary["layers_quantized"] == 4
    assert summary["quantized_layers_ratio"] <= max_ratio, summary
