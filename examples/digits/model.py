"""Provide a small CNN classifier for the 8x8 digits."""

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from mono_quant.lightning.checkpoint import QuantizedCheckpointMixin

NUM_CLASSES = 10


class DigitsCNN(QuantizedCheckpointMixin, L.LightningModule):
    """Classify 8x8 grayscale digits with two conv layers and two linear layers.

    The network is built only from ``nn`` modules in ``self.net`` so that a quantizer can
    replace each Conv2d and Linear in place. ``QuantizedCheckpointMixin`` lets checkpoints of a
    quantized copy restore with ``DigitsCNN.load_from_checkpoint``.

    Args:
        channels: Output channels of the first conv layer. The second conv layer has twice as many.
        hidden: Width of the hidden linear layer.
        lr: Learning rate for Adam.
    """

    def __init__(self, channels: int = 16, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            # Pooling halves the 8x8 input to 4x4 before the linear layers.
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
        # One metric object per stage, because each accumulates state across its epoch.
        self.train_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images of shape (N, 1, 8, 8) to logits of shape (N, 10)."""
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.val_acc(logits, labels)
        self.log("val_loss", loss)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.log("test_loss", F.cross_entropy(logits, labels))
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
