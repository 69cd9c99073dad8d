"""Tests for quantize_parameter: weight-only storage of parameters used through functional calls."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.parametrized import quantize_parameter, share_parameter


class Projection(nn.Module):
    """A custom layer that uses its weight through a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(12, 20) / 4)
        self.steps = nn.Parameter(torch.arange(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj_weight)


def projection(seed: int) -> Projection:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Projection()


SPECS = [
    pytest.param(QuantSpec(bits=8, granularity="per_channel"), id="int8"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=8), id="int4_g8"),
]


@pytest.mark.parametrize("spec", SPECS)
def test_parameter_forward_uses_dequantized(spec: QuantSpec) -> None:
    module = projection(0)
    float_weight = module.proj_weight.detach().clone()
    storage = quantize_parameter(module, "proj_weight", spec)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))

    output = module(x)

    assert "proj_weight" not in dict(module.named_parameters())
    assert torch.equal(module.proj_weight, storage.dequantized_weight())
    torch.testing.assert_close(output, F.linear(x, storage.dequantized_weight()))
    assert float((module.proj_weight - float_weight).abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_parameter_cast_copy(dtype: torch.dtype) -> None:
    module = projection(2)
    expected = module.proj_weight.detach().to(dtype).float()

    storage = quantize_parameter(module, "proj_weight", dtype=dtype)

    assert storage.weight.dtype == dtype
    assert module.proj_weight.dtype == torch.float32
    assert torch.equal(module.proj_weight, expected)


def test_parameter_state_dict_round_trip() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=8)
    module = projection(3)
    quantize_parameter(module, "proj_weight", spec)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = projection(4)
    quantize_parameter(rebuilt, "proj_weight", spec)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))

    assert "parametrizations.proj_weight.0.weight_codes" in module.state_dict()
    assert torch.equal(rebuilt.proj_weight, module.proj_weight)


def test_parameter_assignment_rejected() -> None:
    module = projection(5)
    quantize_parameter(module, "proj_weight", QuantSpec(bits=8, granularity="per_channel"))

    with pytest.raises(TypeError, match="stored quantized and cannot be assigned"):
        module.proj_weight = torch.zeros(12, 20)


def test_parameter_shared_by_two_modules() -> None:
    first, second = projection(6), projection(7)
    second.proj_weight = first.proj_weight
    storage = quantize_parameter(first, "proj_weight", QuantSpec(bits=8, granularity="per_channel"))

    share_parameter(second, "proj_weight", storage)

    assert second.parametrizations.proj_weight[0] is storage
    assert torch.equal(second.proj_weight, first.proj_weight)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("missing", {"dtype": torch.float16}, "no floating-point parameter 'missing'"),
        ("steps", {"dtype": torch.float16}, "no floating-point parameter 'steps'"),
        ("proj_weight", {}, "exactly one of weight_spec"),
    ],
    ids=["missing", "integer", "no_format"],
)
def test_parameter_rejects_invalid(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_parameter(projection(8), name, **kwargs)
