"""Tests for CastLayer: 16-bit weights inside a float32 model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.nn.cast import CastLayer

HALF_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]


def seeded(build, seed: int) -> nn.Module:
    """Call ``build`` with torch's global generator seeded, leaving the outer state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


def rounding_tolerance(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound the error of evaluating a float32 layer in ``dtype``.

    ``magnitude`` is ``|x| @ |W|.T + |bias|`` (or the convolution of the absolute values).
    Rounding x and W each moves a product by at most one unit roundoff u = eps / 2, and the
    output and bias are rounded once more, so 1.5 eps of the magnitude covers all four with
    float32 accumulation.
    """
    return 1.5 * torch.finfo(dtype).eps * magnitude


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cast_linear(dtype: torch.dtype) -> None:
    linear = seeded(lambda: nn.Linear(256, 64), seed=0)
    layer = CastLayer.from_float(linear, dtype)
    x = random_input((16, 256), seed=1)

    output = layer(x)
    with torch.no_grad():
        expected = linear(x)
        magnitude = x.abs() @ linear.weight.abs().T + linear.bias.abs()

    difference = (output - expected).abs()
    tolerance = rounding_tolerance(magnitude, dtype)
    assert layer.module.weight.dtype == dtype
    assert layer.module.bias.dtype == dtype
    assert linear.weight.dtype == torch.float32
    assert output.dtype == torch.float32
    assert bool((difference <= tolerance).all()), f"worst {float((difference / tolerance).max())}"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cast_conv2d(dtype: torch.dtype) -> None:
    conv = seeded(lambda: nn.Conv2d(8, 16, 3, padding=1, groups=2), seed=2)
    layer = CastLayer.from_float(conv, dtype)
    x = random_input((2, 8, 10, 10), seed=3)

    output = layer(x)
    with torch.no_grad():
        expected = conv(x)
        magnitude = F.conv2d(x.abs(), conv.weight.abs(), conv.bias.abs(), padding=1, groups=2)

    difference = (output - expected).abs()
    tolerance = rounding_tolerance(magnitude, dtype)
    assert layer.module.weight.dtype == dtype
    assert output.dtype == torch.float32
    assert output.shape == expected.shape
    assert bool((difference <= tolerance).all()), f"worst {float((difference / tolerance).max())}"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cast_output_follows_input_dtype(dtype: torch.dtype) -> None:
    layer = CastLayer(seeded(lambda: nn.Linear(8, 4), seed=4), dtype)
    x = random_input((3, 8), seed=5).double()

    assert layer(x).dtype == torch.float64


class RecordInputs(nn.Module):
    """Linear layer that records the extra arguments it receives and gathers rows by index."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.received: list[object] = []

    def forward(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, *, count: int):
        self.received.extend([index, mask, count])
        return {"rows": self.linear(x)[index], "mask": mask, "first": x.dtype}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cast_integer_inputs_untouched(dtype: torch.dtype) -> None:
    layer = CastLayer(seeded(RecordInputs, seed=6), dtype)
    x = random_input((5, 8), seed=7)
    index = torch.tensor([4, 0, 2])
    mask = torch.tensor([True, False, True])

    output = layer(x, index, mask=mask, count=3)
    received_index, received_mask, received_count = layer.module.received

    assert received_index is index
    assert received_mask is mask
    assert received_count == 3
    assert output["first"] == dtype
    assert output["rows"].dtype == torch.float32
    assert output["rows"].shape == (3, 4)
    assert output["mask"] is mask


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cast_embedding_integer_only_input(dtype: torch.dtype) -> None:
    embedding = seeded(lambda: nn.Embedding(10, 6), seed=8)
    layer = CastLayer(embedding, dtype)
    index = torch.tensor([[1, 9], [3, 3]])

    output = layer(index)
    expected = embedding.weight.detach().to(dtype).float()[index]

    # With no floating input there is no dtype to follow, so the output is float32.
    assert output.dtype == torch.float32
    assert torch.equal(output, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8], ids=str)
def test_cast_rejects_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="is not float16 or bfloat16"):
        CastLayer(nn.Linear(2, 2), dtype)
