"""QAT follows activation_granularity: training rounds inputs as the converted layer will."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.transform.qat import convert_qat, prepare_qat


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_qat_and_converted_round_inputs_alike(granularity: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    config = mq.QuantConfig(bits=8, activations="dynamic", activation_granularity=granularity)
    # Rows of very different size, so per-token and per-tensor grids differ.
    x = torch.randn(4, 16) * torch.tensor([[0.01], [0.1], [1.0], [10.0]])

    prepared = prepare_qat(model, config)
    converted = convert_qat(prepared)

    assert prepared[0].activation_granularity == granularity
    assert converted[0].activation_granularity == granularity
    with torch.no_grad():
        assert torch.equal(prepared[0].quantize_input(x), converted[0].quantize_input(x))
