"""Tests for QuantEmbedding and QuantEmbeddingBag against float lookups of the dequantized table."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.layout import to_blocks
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.embedding import QuantEmbedding, QuantEmbeddingBag

ROW_SPECS = [
    pytest.param(QuantSpec(bits=8, granularity="per_channel"), id="int8_per_row"),
    pytest.param(QuantSpec(bits=8, symmetric=False, granularity="per_channel"), id="uint8_per_row"),
    pytest.param(QuantSpec(bits=4, granularity="per_channel"), id="int4_per_row"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=8), id="int4_g8"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=5), id="int4_g5_short_last"),
    pytest.param(QuantSpec(bits=2, granularity="per_group", group_size=8), id="int2_g8"),
]


def seeded_embedding(seed: int, num: int = 40, dim: int = 24, **kwargs) -> nn.Embedding:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Embedding(num, dim, **kwargs)


def random_indices(shape: tuple[int, ...], high: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", ROW_SPECS)
def test_embedding_forward_equals_reference(spec: QuantSpec) -> None:
    layer = QuantEmbedding.from_float(seeded_embedding(0), spec)
    indices = random_indices((3, 9), 40, seed=1)

    assert torch.equal(layer(indices), layer.forward_reference(indices))


@pytest.mark.parametrize("spec", ROW_SPECS)
def test_embedding_rows_within_half_step(spec: QuantSpec) -> None:
    embedding = seeded_embedding(2)
    layer = QuantEmbedding.from_float(embedding, spec)
    table = embedding.weight.detach()

    error = to_blocks((layer.dequantized_weight() - table).abs(), spec)
    # Half a step, plus float32 rounding of the dequantized value itself.
    bound = layer.weight_scale.unsqueeze(-1) / 2 * (1 + 1e-5)
    bound = bound + to_blocks(table.abs(), spec) * torch.finfo(torch.float32).eps

    assert layer.weight_scale.shape[0] == table.shape[0]
    assert bool((error <= bound).all())


@pytest.mark.parametrize("spec", ROW_SPECS)
def test_embedding_padding_row_exactly_zero(spec: QuantSpec) -> None:
    embedding = seeded_embedding(3, padding_idx=5)
    layer = QuantEmbedding.from_float(embedding, spec)

    output = layer(torch.tensor([[5, 1, 5]]))

    assert bool((output[0, 0] == 0).all())
    assert bool((output[0, 2] == 0).all())
    assert bool((layer.dequantized_weight()[5] == 0).all())


def test_embedding_max_norm_matches_float() -> None:
    embedding = seeded_embedding(4, max_norm=1.5)
    layer = QuantEmbedding.from_float(embedding, QuantSpec(bits=8, granularity="per_channel"))
    indices = torch.tensor([[0, 3, 3, 7], [9, 0, 1, 2]])

    output = layer(indices)
    expected = F.embedding(indices, layer.dequantized_weight(), max_norm=1.5)

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
    assert float(output.norm(dim=-1).max()) <= 1.5 * (1 + 1e-5)


def test_embedding_weight_property_dequantizes() -> None:
    layer = QuantEmbedding.from_float(
        seeded_embedding(5), QuantSpec(bits=4, granularity="per_channel")
    )

    assert torch.equal(layer.weight, layer.dequantized_weight())


def test_embedding_state_dict_round_trip() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=8)
    layer = QuantEmbedding.from_float(seeded_embedding(6), spec)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = QuantEmbedding.from_float(seeded_embedding(7), spec)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    indices = random_indices((4, 5), 40, seed=8)

    assert torch.equal(rebuilt(indices), layer(indices))


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_embedding_rejects_activations(activations: str) -> None:
    with pytest.raises(ValueError, match="integer indices"):
        QuantEmbedding.from_float(
            seeded_embedding(9), QuantSpec(granularity="per_channel"), activations=activations
        )


def test_embedding_rejects_column_axis() -> None:
    with pytest.raises(ValueError, match="per_channel axis 0"):
        QuantEmbedding.from_float(
            seeded_embedding(10), QuantSpec(granularity="per_channel", axis=1)
        )


BAG_CASES = [
    pytest.param({"mode": "sum"}, id="sum"),
    pytest.param({"mode": "mean"}, id="mean"),
    pytest.param({"mode": "max"}, id="max"),
    pytest.param({"mode": "mean", "padding_idx": 2}, id="mean_padding"),
    pytest.param({"mode": "sum", "include_last_offset": True}, id="sum_last_offset"),
]


def seeded_bag(seed: int, **kwargs) -> nn.EmbeddingBag:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.EmbeddingBag(30, 16, **kwargs)


@pytest.mark.parametrize("spec", ROW_SPECS)
@pytest.mark.parametrize("kwargs", BAG_CASES)
def test_embedding_bag_matches_float_bag(kwargs: dict, spec: QuantSpec) -> None:
    bag = seeded_bag(11, **kwargs)
    layer = QuantEmbeddingBag.from_float(bag, spec)
    indices = torch.tensor([2, 4, 2, 9, 2, 17, 29, 0, 5])
    offsets = torch.tensor([0, 3, 3, 6, 9] if kwargs.get("include_last_offset") else [0, 3, 3, 6])

    output = layer(indices, offsets)
    reference = layer.forward_reference(indices, offsets)
    with torch.no_grad():
        bag.weight.copy_(layer.dequantized_weight())
        expected = bag(indices, offsets)

    torch.testing.assert_close(output, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


def test_embedding_bag_per_sample_weights() -> None:
    bag = seeded_bag(12, mode="sum")
    layer = QuantEmbeddingBag.from_float(bag, QuantSpec(bits=8, granularity="per_channel"))
    indices = torch.tensor([[1, 2, 3], [4, 4, 0]])
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(13))

    output = layer(indices, per_sample_weights=weights)
    with torch.no_grad():
        bag.weight.copy_(layer.dequantized_weight())
        expected = bag(indices, per_sample_weights=weights)

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


INT8_ROWS = QuantSpec(bits=8, granularity="per_channel")


@pytest.mark.parametrize("bad", [-1, -40, 40])
def test_embedding_rejects_bad_index(bad: int) -> None:
    # Indexing the unpacked rows would read row -1 as the last row instead of raising.
    layer = QuantEmbedding.from_float(seeded_embedding(seed=30), INT8_ROWS)
    indices = torch.tensor([[bad, 0]])

    with pytest.raises(IndexError, match=rf"index {bad}, outside the table's 40 rows"):
        layer(indices)


@pytest.mark.parametrize("bad", [-1, 40])
def test_bag_rejects_bad_index(bad: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(31)
        bag = nn.EmbeddingBag(40, 24, mode="sum")
    layer = QuantEmbeddingBag.from_float(bag, INT8_ROWS)
    indices = torch.tensor([bad, 0, 5])
    offsets = torch.tensor([0, 2])

    with pytest.raises(IndexError, match=rf"index {bad}, outside"):
        layer(indices, offsets)


def test_embedding_empty_input_like_float() -> None:
    embedding = seeded_embedding(seed=32)
    bag = nn.EmbeddingBag(40, 24, mode="mean")
    quantized = QuantEmbedding.from_float(embedding, INT8_ROWS)
    quantized_bag = QuantEmbeddingBag.from_float(bag, INT8_ROWS)
    indices = torch.zeros(0, 3, dtype=torch.long)

    assert quantized(indices).shape == embedding(indices).shape
    assert quantized_bag(indices).shape == bag(indices).shape
