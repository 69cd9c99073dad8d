import pytest
import torch
from torch import nn

from mono_quant.evaluate.size import model_size_bytes

FLOAT32_BYTES = 4
BFLOAT16_BYTES = 2
UINT8_BYTES = 1


class LinearWithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(5))
        self.register_buffer("packed", torch.zeros(7, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale[0]


def test_size_counts_parameters_and_buffers() -> None:
    model = LinearWithBuffers()

    weight_and_bias = (4 * 3 + 3) * FLOAT32_BYTES
    scale_buffer = 5 * FLOAT32_BYTES
    packed_buffer = 7 * UINT8_BYTES

    assert model_size_bytes(model) == weight_and_bias + scale_buffer + packed_buffer


def test_size_uses_stored_dtype() -> None:
    model = nn.Linear(8, 2).to(torch.bfloat16)

    assert model_size_bytes(model) == (8 * 2 + 2) * BFLOAT16_BYTES


def test_size_counts_tied_weight_once() -> None:
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)

    assert model_size_bytes(model) == 10 * 4 * FLOAT32_BYTES


def test_size_counts_shared_storage_once() -> None:
    shared = torch.randn(6, 2)
    model = nn.Module()
    # Two distinct Parameter objects over the same storage, as some weight-tying code makes.
    model.first = nn.Parameter(shared)
    model.second = nn.Parameter(shared)

    assert model.first is not model.second
    assert model_size_bytes(model) == 6 * 2 * FLOAT32_BYTES


def test_size_counts_different_views_separately() -> None:
    base = torch.randn(4, 4)
    model = nn.Module()
    model.register_buffer("full", base)
    model.register_buffer("rows", base[1:])

    assert model_size_bytes(model) == (16 + 12) * FLOAT32_BYTES


def test_size_counts_meta_tensors() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))

    assert model_size_bytes(model) == (3 * 5 + 5 + 5 * 2 + 2) * FLOAT32_BYTES


def test_size_of_empty_module_is_zero() -> None:
    assert model_size_bytes(nn.ReLU()) == 0


def test_size_rejects_state_dict() -> None:
    state_dict = nn.Linear(2, 2).state_dict()

    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        model_size_bytes(state_dict)
