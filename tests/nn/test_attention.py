"""Tests for QuantMultiheadAttention, CastMultiheadAttention and the transformer fused paths."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import mono_quant as mq
import mono_quant.nn.linear as linear_module
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.attention import (
    PROJECTIONS,
    REFERENCE,
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


# ---- projections path: QuantLinear kernels around scaled_dot_product_attention ---------------


def self_attention_input(batch_first: bool, embed: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, TARGET, embed) if batch_first else (TARGET, BATCH, embed)
    return torch.randn(shape, generator=generator)


@pytest.fixture
def exact_linear_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the projections to the float32 workspace, whose weights equal the reference's."""
    monkeypatch.setattr(linear_module, "dense_applies", lambda *args: False)
    monkeypatch.setattr(linear_module, "fbgemm_engine", lambda: None)
    monkeypatch.setattr(linear_module, "has_int8pack_mm", lambda: False)
    monkeypatch.setattr(linear_module, "INT4PACK_MAX_ROWS", 0)
    monkeypatch.setattr(linear_module, "has_native_bfloat16", lambda: False)


@pytest.mark.parametrize("activations", [None, "dynamic"])
@pytest.mark.parametrize("spec", [INT8, INT4_G8], ids=["int8", "int4_g8"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_projections_path_matches_reference(
    batch_first: bool, spec: QuantSpec, activations: str | None, exact_linear_paths
) -> None:
    mha = float_mha({"batch_first": batch_first}, seed=20)
    layer = QuantMultiheadAttention.from_float(mha, spec, activations=activations)
    x = self_attention_input(batch_first, EMBED, seed=21)

    with torch.no_grad():
        path = layer.kernel_for(x, x, x, need_weights=False)
        output, weights = layer(x, x, x, need_weights=False)
        expected, _ = layer.forward_reference(x, x, x, need_weights=False)

    assert path == PROJECTIONS
    assert weights is None
    # Same weights and the same rounded inputs: only the order of float operations differs.
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_projections_padding_mask_matches_reference(
    batch_first: bool, mask_dtype: torch.dtype, exact_linear_paths
) -> None:
    mha = float_mha({"batch_first": batch_first}, seed=32)
    layer = QuantMultiheadAttention.from_float(mha, INT8, activations="dynamic")
    x = self_attention_input(batch_first, EMBED, seed=33)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[1, 3:] = True
    mask = padding
    if mask_dtype == torch.float32:
        mask = torch.zeros(BATCH, TARGET).masked_fill(padding, float("-inf"))

    with torch.no_grad():
        path = layer.kernel_for(x, x, x, key_padding_mask=mask, need_weights=False)
        output, _ = layer(x, x, x, key_padding_mask=mask, need_weights=False)
        expected, _ = layer.forward_reference(x, x, x, key_padding_mask=mask, need_weights=False)
        unmasked, _ = layer(x, x, x, need_weights=False)

    assert path == PROJECTIONS
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    # The mask changes the second sequence only.
    batch_dim = 0 if batch_first else 1
    torch.testing.assert_close(output.select(batch_dim, 0), unmasked.select(batch_dim, 0))
    assert not torch.allclose(output.select(batch_dim, 1), unmasked.select(batch_dim, 1))


def causal_masks() -> dict[str, torch.Tensor]:
    float_mask = nn.Transformer.generate_square_subsequent_mask(TARGET)
    return {
        "bool": torch.isinf(float_mask),
        "float": float_mask,
        "per_head": float_mask.expand(BATCH * HEADS, TARGET, TARGET).clone(),
    }


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["mask", "mask_and_is_causal"])
@pytest.mark.parametrize("kind", ["bool", "float", "per_head"])
def test_projections_attn_mask_matches_reference(
    kind: str, is_causal: bool, padded: bool, exact_linear_paths
) -> None:
    mha = float_mha({"batch_first": True}, seed=36)
    layer = QuantMultiheadAttention.from_float(mha, INT8, activations="dynamic")
    x = self_attention_input(True, EMBED, seed=37)
    padding = None
    if padded:
        padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
        padding[1, 3:] = True
        if kind != "bool":
            # torch warns when the two masks differ in type.
            padding = torch.zeros(BATCH, TARGET).masked_fill(padding, float("-inf"))
    masks = {"attn_mask": causal_masks()[kind], "key_padding_mask": padding}

    with torch.no_grad():
        path = layer.kernel_for(x, x, x, need_weights=False, is_causal=is_causal, **masks)
        output, _ = layer(x, x, x, need_weights=False, is_causal=is_causal, **masks)
        expected, _ = layer.forward_reference(
            x, x, x, need_weights=False, is_causal=is_causal, **masks
        )
        unmasked, _ = layer(x, x, x, need_weights=False)

    assert path == PROJECTIONS
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    # The causal mask leaves only the last position, which attends to every key, unchanged.
    assert not torch.allclose(output[0, 0], unmasked[0, 0])
    torch.testing.assert_close(output[0, -1], unmasked[0, -1], rtol=1e-5, atol=1e-6)


def test_projections_path_with_int8_kernel_matches_reference() -> None:
    # 768x256 and 256x256 weights are past the dense limit, so dynamic inputs run fbgemm,
    # which rounds x * (1 / scale): a value within float rounding of a tie lands one code away.
    embed = 256
    with torch.random.fork_rng():
        torch.manual_seed(22)
        mha = nn.MultiheadAttention(embed, 8, batch_first=True).eval()
    layer = QuantMultiheadAttention.from_float(mha, INT8, activations="dynamic")
    x = self_attention_input(True, embed, seed=23)

    with torch.no_grad():
        output, _ = layer(x, x, x, need_weights=False)
        expected, _ = layer.forward_reference(x, x, x, need_weights=False)
        # One code step of the output projection's input, times its largest weight.
        attention_scale = expected.abs().amax() / 127
        out_weight = layer.dequantized_weight(name="out_proj_weight").abs().amax()

    assert layer.kernel_for(x, x, x, need_weights=False) == PROJECTIONS
    torch.testing.assert_close(
        output, expected, rtol=1e-4, atol=float(2 * attention_scale * out_weight)
    )
    assert sqnr_db(expected, output) >= 60.0


@pytest.mark.parametrize(
    ("call", "kwargs"),
    [
        pytest.param({"need_weights": True}, {}, id="need_weights"),
        pytest.param({"attn_mask": "wrong_shape"}, {}, id="attn_mask_shape"),
        pytest.param({"is_causal": True}, {}, id="is_causal_without_mask"),
        pytest.param({"key_padding_mask": "wrong_shape"}, {}, id="padding_mask_shape"),
        pytest.param({"key_padding_mask": "float64"}, {}, id="padding_mask_float64"),
        pytest.param({}, {"add_bias_kv": True}, id="bias_kv"),
        pytest.param({}, {"add_zero_attn": True}, id="zero_attn"),
        pytest.param({}, {"kdim": 6, "vdim": 10}, id="separate_qkv"),
        pytest.param({"cross": True}, {}, id="cross_attention"),
        pytest.param({"dtype": torch.float64}, {}, id="float64"),
    ],
)
def test_projections_path_only_for_plain_self_attention(call: dict, kwargs: dict) -> None:
    mha = float_mha({"batch_first": True, **kwargs}, seed=24)
    layer = QuantMultiheadAttention.from_float(mha, INT8)
    x = self_attention_input(True, EMBED, seed=25).to(call.get("dtype", torch.float32))
    key = value = x
    if call.get("cross") or "kdim" in kwargs:
        key = torch.randn(BATCH, SOURCE, kwargs.get("kdim", EMBED), dtype=x.dtype)
        value = torch.randn(BATCH, SOURCE, kwargs.get("vdim", EMBED), dtype=x.dtype)
    masks = {
        "attn_mask": torch.zeros(TARGET, TARGET + 1) if call.get("attn_mask") else None,
        "key_padding_mask": None,
    }

    if call.get("key_padding_mask") == "wrong_shape":
        masks["key_padding_mask"] = torch.zeros(BATCH, TARGET + 1, dtype=torch.bool)
    if call.get("key_padding_mask") == "float64":
        masks["key_padding_mask"] = torch.zeros(BATCH, TARGET, dtype=torch.float64)

    need_weights = call.get("need_weights", False)
    is_causal = call.get("is_causal", False)

    path = layer.kernel_for(x, key, value, need_weights=need_weights, is_causal=is_causal, **masks)

    assert path == REFERENCE


def test_projections_skip_dropout_and_grad() -> None:
    mha = nn.MultiheadAttention(EMBED, HEADS, dropout=0.1, batch_first=True)
    layer = QuantMultiheadAttention.from_float(mha, INT8)
    x = self_attention_input(True, EMBED, seed=26)

    assert layer.training
    assert layer.kernel_for(x, x, x, need_weights=False) == REFERENCE
    layer.eval()
    assert layer.kernel_for(x, x, x, need_weights=False) == PROJECTIONS
    assert layer.kernel_for(x.requires_grad_(), x, x, need_weights=False) == REFERENCE


def test_projections_path_follows_loaded_weights() -> None:
    layer = QuantMultiheadAttention.from_float(float_mha({"batch_first": True}, seed=27), INT8)
    other = QuantMultiheadAttention.from_float(float_mha({"batch_first": True}, seed=28), INT8)
    x = self_attention_input(True, EMBED, seed=29)

    with torch.no_grad():
        before, _ = layer(x, x, x, need_weights=False)
        layer.load_state_dict(other.state_dict())
        after, _ = layer(x, x, x, need_weights=False)
        expected, _ = other(x, x, x, need_weights=False)

    assert not torch.equal(before, after)
    assert torch.equal(after, expected)


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "padding_mask"])
def test_projections_path_in_quantized_transformer_encoder(padded: bool) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(30)
        block = nn.TransformerEncoderLayer(EMBED, HEADS, 32, batch_first=True)
        encoder = nn.TransformerEncoder(block, 2, enable_nested_tensor=False).eval()
    x = torch.randn(BATCH, TARGET, EMBED, generator=torch.Generator().manual_seed(31))
    padding = None
    if padded:
        padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
        padding[1, 3:] = True
    quantized = mq.quantize(encoder, "w8a8-dynamic")
    paths: list[str] = []

    def record(module, args, kwargs):
        paths.append(module.kernel_for(*args, **kwargs))

    for module in quantized.modules():
        if isinstance(module, QuantMultiheadAttention):
            module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        output = quantized(x, src_key_padding_mask=padding)
        with mq.reference_kernels():
            expected = quantized(x, src_key_padding_mask=padding)

    assert paths[:2] == [PROJECTIONS, PROJECTIONS]
    assert paths[2:] == [REFERENCE, REFERENCE]
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_non_finite_input_error_names_attention_layer() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(34)
        block = nn.TransformerEncoderLayer(EMBED, HEADS, 32, batch_first=True)
        encoder = nn.TransformerEncoder(block, 1, enable_nested_tensor=False).eval()
    quantized = mq.quantize(encoder, "w8a8-dynamic")
    x = torch.randn(BATCH, TARGET, EMBED, generator=torch.Generator().manual_seed(35))
    x[0, 0, 0] = float("inf")

    with torch.no_grad(), pytest.raises(ValueError) as error:
        quantized(x)

    message = str(error.value)
    assert message.startswith("the input of QuantMultiheadAttention 'layers.0.self_attn'")
    assert "QuantConfig(overrides={'layers.0.self_attn': None})" in message
