"""A small model, data module and weight files for the mono-quant command tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(nn.Module):
    """A two-layer MLP over 16 features; ``hidden`` changes the architecture."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x))


class TinyData(L.LightningDataModule):
    """Random features with class labels, 6 training and 2 validation batches of 8."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 16, generator=generator)
        self.y = torch.randint(0, 4, (64,), generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:48], self.y[:48]), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[48:], self.y[48:]), batch_size=self.batch_size)


MODEL = f"{TinyNet.__module__}.TinyNet"
DATA = f"{TinyData.__module__}.TinyData"


def write_checkpoint(path: Path, hidden: int = 12) -> Path:
    """Write a Lightning-style checkpoint of TinyNet(hidden) with its hyper-parameters."""
    torch.manual_seed(0)
    state = TinyNet(hidden).state_dict()
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": {"hidden": hidden, "_instantiator": "ignored"},
        "pytorch-lightning_version": L.__version__,
    }
    torch.save(checkpoint, path)
    return path


def write_state_dict(path: Path, hidden: int = 8) -> tuple[TinyNet, Path]:
    """Write ``torch.save(TinyNet(hidden).state_dict())``; return the model and the path."""
    torch.manual_seed(0)
    model = TinyNet(hidden)
    torch.save(model.state_dict(), path)
    return model, path


class ValidationOnlyData(L.LightningDataModule):
    """TinyData's validation batches without a train_dataloader."""

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 16, generator=generator)
        self.y = torch.randint(0, 4, (16,), generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


VALIDATION_ONLY_DATA = f"{ValidationOnlyData.__module__}.ValidationOnlyData"
