"""An LSTM language model quantized int8 weight-only: close to float, and exact after save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.nn import QuantEmbedding, QuantLinear, QuantLSTM

VOCABULARY, WIDTH, HIDDEN = 400, 96, 192

# Acceptance bound for int8 weight-only: ||logits_q - logits|| / ||logits||.
MAX_INT8_RELATIVE_ERROR = 2e-2


class LanguageModel(nn.Module):
    """Token embedding, a two-layer LSTM with dropout between layers, and a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH)
        self.lstm = nn.LSTM(WIDTH, HIDDEN, num_layers=2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(HIDDEN, VOCABULARY)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(hidden)


def language_model(seed: int) -> LanguageModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LanguageModel().eval()


@pytest.fixture(scope="module")
def float_model() -> LanguageModel:
    return language_model(seed=0)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCABULARY, (8, 24), generator=torch.Generator().manual_seed(1))


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def test_lstm_lm_int8_relative_error(float_model: LanguageModel, tokens: torch.Tensor) -> None:
    quantized = mq.quantize(float_model, "w8")

    with torch.no_grad():
        error = relative_error(float_model(tokens), quantized(tokens))

    assert isinstance(quantized.embedding, QuantEmbedding)
    assert isinstance(quantized.lstm, QuantLSTM)
    assert isinstance(quantized.head, QuantLinear)
    assert not quantized.lstm.training
    assert error <= MAX_INT8_RELATIVE_ERROR, f"relative error {error:.4f}"


@pytest.mark.parametrize("preset", ["w8", "w8a8-dynamic", "w4"])
def test_lstm_lm_save_load_bit_identical(
    float_model: LanguageModel, tokens: torch.Tensor, preset: str, tmp_path
) -> None:
    quantized = mq.quantize(float_model, preset)
    torch.save(quantized.state_dict(), tmp_path / "lm.pt")

    rebuilt = mq.quantize(language_model(seed=2), preset)
    rebuilt.load_state_dict(torch.load(tmp_path / "lm.pt", weights_only=True), strict=True)

    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), quantized(tokens))
