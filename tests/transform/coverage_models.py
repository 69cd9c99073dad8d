"""Small models, one per supported module type, shared by the coverage tests.

Each factory returns ``(model, example_input)``; the input is a tensor or a tuple of positional
arguments. Every model is in eval mode and built under a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class EmbeddingNet(nn.Module):
    """Token embedding and a bag of the same tokens, both with a padding row, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(60, 32, padding_idx=0)
        self.bag = nn.EmbeddingBag(60, 32, mode="mean", padding_idx=0)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(tokens).mean(dim=1) + self.bag(tokens))


class RecurrentNet(nn.Module):
    """Bidirectional two-layer LSTM followed by a GRU and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(64, 32, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.lstm(x)
        features, _ = self.gru(features)
        return self.head(features)


class AttentionNet(nn.Module):
    """MultiheadAttention over its input, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(x, x, x, need_weights=False)
        return self.head(attended)


class TransformerNet(nn.Module):
    """A two-layer TransformerEncoder feeding a TransformerDecoderLayer."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.decoder = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.encoder(x)
        return self.decoder(x, memory)


class HandAttention(nn.Module):
    """Self-attention written with Linear layers and functional softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(32, 32)
        self.key = nn.Linear(32, 32)
        self.value = nn.Linear(32, 32)
        self.output = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(-2, -1) / 32**0.5
        return self.output(F.softmax(scores, dim=-1) @ self.value(x))


class UpsamplingNet(nn.Module):
    """Grouped and depthwise convolutions followed by transposed convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.up = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.up1d = nn.ConvTranspose1d(8, 4, 3, padding=1)
        self.up3d = nn.ConvTranspose3d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(F.relu(self.depthwise(F.relu(self.grouped(x)))))
        x = self.up1d(x.flatten(2))
        return self.up3d(x.reshape(x.shape[0], 4, 4, 8, 8))


class TiedLanguageModel(nn.Module):
    """Embedding, LSTM and an output head that shares the embedding's weight."""

    def __init__(self, vocabulary: int = 64, width: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(hidden)


class FunctionalBlock(nn.Module):
    """A custom block that uses its parameters only through functional calls."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(48, 32) / 32**0.5)
        self.gate = nn.Parameter(torch.ones(48))
        self.head = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(F.linear(x, self.proj_weight)) * self.gate)


def embedding_example() -> Example:
    tokens = torch.randint(1, 60, (4, 9), generator=torch.Generator().manual_seed(1))
    tokens[:, -2:] = 0
    return _seeded(EmbeddingNet, 0), (tokens,)


def recurrent_example() -> Example:
    return _seeded(RecurrentNet, 3), (_randn(4, 12, 16, seed=4),)


def attention_example() -> Example:
    return _seeded(AttentionNet, 5), (_randn(4, 10, 32, seed=6),)


def transformer_example() -> Example:
    return _seeded(TransformerNet, 7), (_randn(4, 10, 32, seed=8),)


def hand_attention_example() -> Example:
    return _seeded(HandAttention, 9), (_randn(4, 10, 32, seed=10),)


def upsampling_example() -> Example:
    return _seeded(UpsamplingNet, 11), (_randn(2, 8, 8, 8, seed=12),)


def tied_example() -> Example:
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(14))
    return _seeded(TiedLanguageModel, 13), (tokens,)


def functional_example() -> Example:
    return _seeded(FunctionalBlock, 15), (_randn(4, 32, seed=16),)


EXAMPLES: dict[str, Callable[[], Example]] = {
    "embedding": embedding_example,
    "recurrent": recurrent_example,
    "attention": attention_example,
    "transformer": transformer_example,
    "hand_attention": hand_attention_example,
    "upsampling": upsampling_example,
    "tied": tied_example,
}
