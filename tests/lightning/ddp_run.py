"""Run a tiny fit under a DDP strategy on 2 CPU processes and dump the quantizer state per rank.

Usage: python ddp_run.py STRATEGY MODE OUT_DIR. Each rank writes ``rank<r>.json`` with its
quantizer scales; rank zero also saves the quantized artifact. Run by tests/lightning/test_ddp.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mono_quant.lightning import QuantizeCallback
from mono_quant.nn import QuantizedLayer
from mono_quant.nn.fake_quant import FakeQuantize

SAMPLES = 64
BATCH = 8


def dataset() -> TensorDataset:
    """Return inputs whose range grows with the index, so the two ranks see different ranges."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 16, generator=generator) * torch.linspace(0.5, 4.0, SAMPLES)[:, None]
    y = torch.randint(0, 4, (SAMPLES,), generator=generator)
    return TensorDataset(x, y)


class Tiny(L.LightningModule):
    """Two linear layers; enough to exercise observers on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)

    def val_dataloader(self):
        return DataLoader(dataset(), batch_size=BATCH, shuffle=False)


class DumpState(L.Callback):
    """Write this rank's quantizer state after QuantizeCallback has run, inside the worker."""

    def __init__(self, quantize: QuantizeCallback, out_dir: Path) -> None:
        self.quantize = quantize
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: dict = {"rank": trainer.global_rank}
        if self.quantize.mode == "qat":
            quantizer = pl_module.net[0].input_fake_quant
            assert isinstance(quantizer, FakeQuantize)
            record["train_input_scale"] = quantizer.current_scale().tolist()
            record["observer_min"] = quantizer.observer.min_val.tolist()
            record["observer_max"] = quantizer.observer.max_val.tolist()
        layer = self.quantize.quantized_model.net[0]
        assert isinstance(layer, QuantizedLayer)
        record["input_scale"] = layer.input_scale.tolist()
        record["input_zero_point"] = layer.input_zero_point.tolist()
        record["weight_scale"] = layer.weight_scale.tolist()
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(strategy: str, mode: str, out_dir: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callback = QuantizeCallback(
        bits=8, mode=mode, save_dir=str(out_dir), verbose=False, calibration_batches=100
    )
    model = Tiny()
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, DumpState(callback, out_dir)],
    )
    trainer.fit(model)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
