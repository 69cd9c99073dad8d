"""Tests for QuantMultiheadAttention, CastMultiheadAttention and the transformer fused paths."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.attention import (
    CastMultiheadAttention,
    QuantMultiheadAttention,
    disable_fused_transformer_paths,
)

INT8 = QuantSpec(bits=8, granularity="per_channel")
INT4_G8 = QuantSpec(bits=4, granularity="per_group", group_size=8)
EMBED, HEADS, TARGET, SOURCE, BATCH = 16, 4, 5, 7, 2

MHA_CASES = [
    pytest.param({}, id="packed"),
    pytest.param({"batch_first": True}, id="packed_batch_first"),
    pytest.param({"kdim": 6, "vdim": 10, "batch_first": True}, id="separate_qkv"),
    pytest.param({"add_bias_kv": True, "add_zero_attn": True}, id="bias_kv_zero_attn"),
    pytest.param({"bias": False}, id="no_bias"),
]


def float_mha(kwargs: dict, seed: int) -> nn.MultiheadAttention:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.MultiheadAttention(EMBED, HEADS, **kwargs).eval()


def with_dequantized(mha: nn.MultiheadAttention, layer: QuantMultiheadAttention):
    reference = copy.deepcopy(mha)
    with torch.no_grad():
        for name in layer.weight_names:
            target = (
                reference.out_proj.weight if name == "out_proj_weight" else getattr(reference, name)
            )
            target.copy_(layer.dequantized_weight(name=name))
    return reference


def inputs(kwargs: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def make(length: int, size: int) -> torch.Tensor:
        if kwargs.get("batch_first"):
            return torch.randn(BATCH, length, size, generator=generator)
        return torch.randn(length, BATCH, size, generator=generator)

    return (
        make(TARGET, EMBED),
        make(SOURCE, kwargs.get("kdim", EMBED)),
        make(SOURCE, kwargs.get("vdim", EMBED)),
    )


def key_padding_mask() -> torch.Tensor:
    mask = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    mask[1, 4:] = True
    return mask


@pytest.mark.parametrize("spec", [INT8, INT4_G8], ids=["int8", "int4_g8"])
@pytest.mark.parametrize("kwargs", MHA_CASES)
def test_mha_matches_dequantized_float(kwargs: dict, spec: QuantSpec) -> None:
    mha = float_mha(kwargs, seed=0)
    layer = QuantMultiheadAttention.from_float(mha, spec)
    query, key, value = inputs(kwargs, seed=1)
    mask = key_padding_mask()

    output, weights = layer(query, key, value, key_padding_mask=mask)
    with torch.no_grad():
        expected, expected_weights = with_dequantized(mha, layer)(
            query, key, value, key_padding_mask=mask
        )

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs", MHA_CASES[:2])
def test_mha_self_attention_causal_mask(kwargs: dict) -> None:
    mha = float_mha(kwargs, seed=2)
    layer = QuantMultiheadAttention.from_float(mha, INT8)
    x, _, _ = inputs(kwargs, seed=3)
    causal = nn.Transformer.generate_square_subsequent_mask(TARGET)

    output, weights = layer(x, x, x, attn_mask=causal, average_attn_weights=False)
    with torch.no_grad():
        expected, expected_weights = with_dequantized(mha, layer)(
            x, x, x, attn_mask=causal, average_attn_weights=False
        )

    assert weights.shape == (BATCH, HEADS, TARGET, TARGET)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-6)


def test_mha_unbatched_input() -> None:
    mha = float_mha({"batch_first": True}, seed=4)
    layer = QuantMultiheadAttention.from_float(mha, INT8)
    x = torch.randn(TARGET, EMBED, generator=torch.Generator().manual_seed(5))

    output, _ = layer(x, x, x)
    with torch.no_grad():
        expected, _ = with_dequantized(mha, layer)(x, x, x)

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = float((reference - output).double().square().sum())
    return 10 * math.log10(float(reference.double().square().sum()) / noise)


@pytest.mark.parametrize("kwargs", MHA_CASES)
def test_mha_dynamic_close_to_float(kwargs: dict) -> None:
    mha = float_mha(kwargs, seed=6)
    layer = QuantMultiheadAttention.from_float(mha, INT8, activations="dynamic")
    query, key, value = inputs(kwargs, seed=7)

    with torch.no_grad():
        expected, _ = mha(query, key, value, need_weights=False)
    output, weights = layer(query, key, value, need_weights=False)

    assert weights is None
    assert sqnr_db(expected, output) >= 30.0


def test_mha_dynamic_rounds_output_projection_input() -> None:
    mha = float_mha({}, seed=8)
    layer = QuantMultiheadAttention.from_float(mha, INT8, activations="dynamic")
    weight_only = QuantMultiheadAttention.from_float(mha, INT8)
    query, key, value = inputs({}, seed=9)

    dynamic_output, _ = layer(query, key, value)
    weight_only_output, _ = weight_only(query, key, value)

    assert not torch.equal(dynamic_output, weight_only_output)


def test_mha_state_dict_round_trip() -> None:
    kwargs = {"kdim": 6, "vdim": 10, "batch_first": True}
    layer = QuantMultiheadAttention.from_float(float_mha(kwargs, seed=10), INT4_G8)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = QuantMultiheadAttention.from_float(float_mha(kwargs, seed=11), INT4_G8)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    query, key, value = inputs(kwargs, seed=12)

    assert "q_proj_weight_codes" in layer.state_dict()
    assert torch.equal(rebuilt(query, key, value)[0], layer(query, key, value)[0])


def test_mha_rejects_static() -> None:
    with pytest.raises(ValueError, match="does not support static activations"):
        QuantMultiheadAttention.from_float(float_mha({}, seed=13), INT8, activations="static")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cast_mha_exposes_attributes(dtype: torch.dtype) -> None:
    mha = float_mha({"batch_first": True}, seed=14)
    layer = CastMultiheadAttention.from_float(mha, dtype)
    x, _, _ = inputs({"batch_first": True}, seed=15)

    output, _ = layer(x, x, x)
    with torch.no_grad():
        expected, _ = mha(x, x, x)

    assert layer.batch_first is True
    assert layer.num_heads == HEADS
    assert layer.in_proj_bias.dtype == dtype
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=0, atol=2e-2)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_disable_fused_paths_keeps_output() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(16)
        layer = nn.TransformerEncoderLayer(EMBED, HEADS, 32, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(BATCH, TARGET, EMBED, generator=torch.Generator().manual_seed(17))
    mask = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    mask[1, 3:] = True

    unfused = copy.deepcopy(encoder)
    changed = disable_fused_transformer_paths(unfused)
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=mask)
        output = unfused(x, src_key_padding_mask=mask)

    assert changed == ["", "layers.0", "layers.1"]
    torch.testing.assert_close(output[~mask], expected[~mask], rtol=0, atol=1e-5)
