"""Lightning checkpoints of quantized modules, and reading float checkpoints safely."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mono_quant as mq
from mono_quant.lightning.checkpoint import (
    QUANTIZED_CHECKPOINT_KEY,
    QuantizedCheckpointMixin,
    add_quantization_layout,
    read_checkpoint,
    restore_quantized_layers,
)


class TinyClassifier(QuantizedCheckpointMixin, L.LightningModule):
    """A two-layer MLP with saved hyper-parameters and the checkpoint mixin."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainClassifier(L.LightningModule):
    """TinyClassifier without the mixin."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ParsedInt(int):
    """An int subclass, like the ones argument parsers return (jsonargparse's PositiveInt)."""


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


@pytest.fixture
def quantized_checkpoint(tmp_path: Path) -> tuple[nn.Module, Path]:
    """Save a checkpoint of a W8A8 TinyClassifier after trainer.test; return both."""
    torch.manual_seed(0)
    config = mq.QuantConfig(bits=4, group_size=ParsedInt(8))
    quantized = mq.quantize(TinyClassifier().eval(), config)
    trainer = _trainer(tmp_path)
    trainer.test(quantized, _loader(), verbose=False)
    path = tmp_path / "quantized.ckpt"
    trainer.save_checkpoint(path)
    return quantized, path


def test_checkpoint_loads_weights_only(quantized_checkpoint) -> None:
    _, path = quantized_checkpoint

    checkpoint = torch.load(path, weights_only=True)

    assert checkpoint[QUANTIZED_CHECKPOINT_KEY]["config"]["group_size"] == 8
    assert "net.0.weight_codes" in checkpoint["state_dict"]


def test_load_from_checkpoint_rebuilds_layers(quantized_checkpoint) -> None:
    quantized, path = quantized_checkpoint

    restored = TinyClassifier.load_from_checkpoint(path).eval()

    x = torch.randn(5, 16)
    assert type(restored.net[0]).__name__ == "QuantLinear"
    assert torch.equal(restored(x), quantized(x))
    assert mq.quantization_report(restored) == mq.quantization_report(quantized)


def test_trainer_test_with_ckpt_path(quantized_checkpoint, tmp_path) -> None:
    quantized, path = quantized_checkpoint
    expected = _trainer(tmp_path).test(quantized, _loader(), verbose=False)

    model = TinyClassifier()
    results = _trainer(tmp_path).test(model, _loader(), ckpt_path=path, verbose=False)

    assert type(model.net[2]).__name__ == "QuantLinear"
    assert results == expected


def test_float_checkpoint_stays_float(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    trainer.fit_loop.max_epochs = 1
    model = TinyClassifier()
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "float.ckpt")

    restored = TinyClassifier.load_from_checkpoint(tmp_path / "float.ckpt")

    assert QUANTIZED_CHECKPOINT_KEY not in torch.load(tmp_path / "float.ckpt", weights_only=True)
    assert type(restored.net[0]) is nn.Linear
    assert torch.equal(restored.net[0].weight, model.net[0].weight)


def test_add_layout_skips_float_module() -> None:
    checkpoint: dict = {"state_dict": {}}

    add_quantization_layout(checkpoint, TinyClassifier())

    assert QUANTIZED_CHECKPOINT_KEY not in checkpoint


def test_restore_without_layout_raises(quantized_checkpoint) -> None:
    _, path = quantized_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[QUANTIZED_CHECKPOINT_KEY]

    with pytest.raises(ValueError, match=r"quantized layers \['net.0', 'net.2'\] but no"):
        restore_quantized_layers(TinyClassifier(), checkpoint)


def test_restore_newer_layout_raises(quantized_checkpoint) -> None:
    _, path = quantized_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[QUANTIZED_CHECKPOINT_KEY]["format_version"] = 99

    with pytest.raises(ValueError, match=r"format_version 99, newer .* upgrade mono_quant"):
        restore_quantized_layers(TinyClassifier(), checkpoint)


def test_restore_other_architecture_raises(quantized_checkpoint) -> None:
    _, path = quantized_checkpoint
    checkpoint = torch.load(path, weights_only=True)

    with pytest.raises(ValueError, match=r"layer 'net.0' has weight 'weight' of shape \[8, 16\]"):
        restore_quantized_layers(TinyClassifier(hidden=8), checkpoint)


def test_plain_module_rejects_quantized_checkpoint(quantized_checkpoint) -> None:
    # Without the mixin, Lightning's strict load_state_dict names the quantized keys.
    _, path = quantized_checkpoint

    with pytest.raises(RuntimeError, match=r"net\.0\.weight_codes"):
        PlainClassifier.load_from_checkpoint(path)


def test_read_checkpoint_returns_float_state(tmp_path) -> None:
    model = PlainClassifier()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {}}, tmp_path / "a.ckpt")

    checkpoint = read_checkpoint(tmp_path / "a.ckpt")

    assert torch.equal(checkpoint["state_dict"]["net.0.weight"], model.net[0].weight)


def _write_artifact(path: Path) -> None:
    mq.save(mq.quantize(PlainClassifier(), "w8"), path)


def _write_state_dict(path: Path) -> None:
    torch.save(PlainClassifier().state_dict(), path)


def _write_qat(path: Path) -> None:
    state = PlainClassifier().state_dict()
    torch.save({"state_dict": state, "mono_quant": {"mode": "qat", "config": {}}}, path)


def _write_quantized(path: Path) -> None:
    state = mq.quantize(PlainClassifier(), "w8").state_dict()
    torch.save({"state_dict": state}, path)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_write_artifact, "is a quantized mono-quant file.*mono_quant.load"),
        (_write_state_dict, "has no 'state_dict' entry.*pass --state_dict"),
        (_write_qat, "written during QAT.*load_qat_checkpoint"),
        (_write_quantized, "already quantized model.*QuantizedCheckpointMixin"),
    ],
    ids=["artifact", "state-dict", "qat", "quantized"],
)
def test_read_checkpoint_rejects(write, message: str, tmp_path) -> None:
    path = tmp_path / "model.ckpt"
    write(path)

    with pytest.raises(ValueError, match=message):
        read_checkpoint(path)


def test_read_checkpoint_missing_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no Lightning checkpoint at"):
        read_checkpoint(tmp_path / "missing.ckpt")


class MakeMarker:
    """Pickle payload: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_read_checkpoint_never_runs_payload(tmp_path) -> None:
    marker = tmp_path / "ran"
    state = PlainClassifier().state_dict()
    torch.save({"state_dict": state, "hyper_parameters": MakeMarker(marker)}, tmp_path / "x.ckpt")

    with pytest.raises(ValueError, match=r"pickled Python object \(\w+\.mkdir\)"):
        read_checkpoint(tmp_path / "x.ckpt")

    assert not marker.exists()
