"""quantize() on one small model per supported module type, for every weight and dynamic preset.

docs/coverage.md names these tests in its module-type x mode table.
"""

from __future__ import annotations

import io

import pytest
import torch
from tests.transform.coverage_models import EXAMPLES, functional_example, tied_example
from torch import nn

import mono_quant as mq
from mono_quant.nn import CastLayer, CastMultiheadAttention, QuantizedLayer
from mono_quant.transform.select import select_layers

# Output SQNR each preset reaches on every coverage model, in dB. The models are random-init, so
# these are floors well below what 8-bit weights give (about 6 dB per bit on well-scaled layers).
MIN_SQNR_DB = {"w8": 30.0, "w8a8-dynamic": 25.0, "w4": 10.0, "fp16": 45.0, "bf16": 30.0}

# Layers each model must have converted, by qualified name.
CONVERTED = {
    "embedding": ["tokens", "bag", "head"],
    "recurrent": ["lstm", "gru", "head"],
    "attention": ["attention", "head"],
    "transformer": [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.linear2",
        "decoder.self_attn",
        "decoder.multihead_attn",
        "decoder.linear1",
    ],
    "hand_attention": ["query", "key", "value", "output"],
    "upsampling": ["grouped", "depthwise", "up", "up1d", "up3d"],
    "tied": ["embedding", "lstm", "head"],
}


def run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def round_trip(quantized: nn.Module, rebuilt: nn.Module) -> nn.Module:
    """Load ``quantized``'s state_dict into ``rebuilt`` through torch.save/torch.load."""
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    return rebuilt


@pytest.mark.parametrize("preset", list(MIN_SQNR_DB))
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_preset_converts_and_matches_float(example: str, preset: str) -> None:
    model, inputs = EXAMPLES[example]()

    quantized = mq.quantize(model, preset)

    for name in CONVERTED[example]:
        assert isinstance(quantized.get_submodule(name), (QuantizedLayer, CastLayer)), name
    measured = mq.sqnr_db(run(model, inputs), run(quantized, inputs))
    assert measured >= MIN_SQNR_DB[preset], f"{example} {preset}: {measured:.1f} dB"


@pytest.mark.parametrize("preset", list(MIN_SQNR_DB))
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_preset_state_dict_round_trip(example: str, preset: str) -> None:
    model, inputs = EXAMPLES[example]()
    quantized = mq.quantize(model, preset)

    rebuilt = round_trip(quantized, mq.quantize(EXAMPLES[example]()[0], preset))

    assert torch.equal(run(rebuilt, inputs), run(quantized, inputs))


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w8"])
def test_embedding_weight_only_under_dynamic(preset: str) -> None:
    model, _ = EXAMPLES["embedding"]()

    quantized = mq.quantize(model, preset)
    rows = {row.name: row for row in mq.quantization_report(quantized).layers}

    assert quantized.tokens.activations is None
    assert quantized.bag.activations is None
    assert rows["tokens"].format == "w8 weight-only, per_channel"
    if preset == "w8a8-dynamic":
        assert "integer indices" in rows["tokens"].reason
        assert rows["head"].format == "w8a8 dynamic, per_channel"


def test_embedding_padding_row_stays_zero() -> None:
    model, _ = EXAMPLES["embedding"]()

    quantized = mq.quantize(model, "w4")
    tokens = torch.zeros(1, 3, dtype=torch.long)

    assert bool((quantized.tokens(tokens) == 0).all())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_transformer_layers_use_unfused_path() -> None:
    model, (x,) = EXAMPLES["transformer"]()
    padding = torch.zeros(x.shape[:2], dtype=torch.bool)
    padding[1, 6:] = True

    quantized = mq.quantize(model, "w8")
    with torch.no_grad():
        output = quantized.encoder(x, src_key_padding_mask=padding)
        expected = model.encoder(x, src_key_padding_mask=padding)

    assert quantized.encoder.use_nested_tensor is False
    assert quantized.encoder.layers[0].activation_relu_or_gelu == 0
    assert mq.sqnr_db(expected[~padding], output[~padding]) >= 30.0


def test_cast_keeps_attention_attributes() -> None:
    model, inputs = EXAMPLES["transformer"]()

    quantized = mq.quantize(model, "fp16")

    assert isinstance(quantized.encoder.layers[0].self_attn, CastMultiheadAttention)
    assert quantized.encoder.layers[0].self_attn.batch_first is True
    assert run(quantized, inputs).dtype == torch.float32


def test_attention_out_proj_has_no_row() -> None:
    model, _ = EXAMPLES["attention"]()

    quantized = mq.quantize(model, "w8")
    names = [row.name for row in mq.quantization_report(quantized).layers]

    assert names == ["attention", "head"]


def test_excluded_attention_counts_out_proj() -> None:
    model, _ = EXAMPLES["attention"]()

    quantized = mq.quantize(model, mq.QuantConfig(bits=8, activations=None, exclude=["attention"]))
    row = mq.quantization_report(quantized).layers[0]

    assert type(quantized.attention) is nn.MultiheadAttention
    assert row.reason == "excluded by pattern 'attention'"
    assert row.float_bytes == sum(p.numel() * 4 for p in model.attention.parameters())


@pytest.mark.parametrize("preset", ["w8", "w4", "w8a8-dynamic", "fp16"])
def test_tied_weight_stored_once(preset: str) -> None:
    model, inputs = tied_example()

    quantized = mq.quantize(model, preset)
    untied, _ = tied_example()
    untied.head.weight = nn.Parameter(untied.embedding.weight.detach().clone())
    separate = mq.quantize(untied, preset)
    head_row = mq.quantization_report(quantized).layers[-1]

    embedding_bytes = mq.model_size_bytes(separate) - mq.model_size_bytes(quantized)
    assert embedding_bytes > 0
    assert "tied to 'embedding' and stored once there" in head_row.reason
    assert head_row.quantized_bytes == 0
    assert mq.sqnr_db(run(model, inputs), run(quantized, inputs)) >= MIN_SQNR_DB[preset]


@pytest.mark.parametrize("preset", ["w8", "w4", "w8a8-dynamic"])
def test_tied_weight_survives_round_trip(preset: str) -> None:
    model, inputs = tied_example()
    quantized = mq.quantize(model, preset)

    rebuilt = round_trip(quantized, mq.quantize(tied_example()[0], preset))

    assert rebuilt.head.weight_codes is rebuilt.embedding.weight_codes
    assert rebuilt.head.weight_scale is rebuilt.embedding.weight_scale
    assert torch.equal(run(rebuilt, inputs), run(quantized, inputs))


def test_tied_cast_shares_parameter() -> None:
    model, _ = tied_example()

    quantized = mq.quantize(model, "bf16")

    assert quantized.head.module.weight is quantized.embedding.module.weight


@pytest.mark.parametrize("preset", ["w8", "w4", "w8a8-dynamic", "fp16"])
def test_functional_parameters_opt_in(preset: str) -> None:
    model, inputs = functional_example()
    config = mq.QuantConfig.from_preset(preset, parameters=["proj_weight", "gate"])

    quantized = mq.quantize(model, config)
    rows = {row.name: row for row in mq.quantization_report(quantized).layers}

    assert rows["proj_weight"].quantized
    assert rows["proj_weight"].type_name == "FunctionalBlock.proj_weight"
    assert not rows["gate"].quantized
    assert "1-D parameters" in rows["gate"].reason
    assert "proj_weight" not in dict(quantized.named_parameters())
    assert mq.sqnr_db(run(model, inputs), run(quantized, inputs)) >= MIN_SQNR_DB[preset]


def test_functional_parameters_round_trip() -> None:
    model, inputs = functional_example()
    config = mq.QuantConfig(bits=4, parameters=["proj_weight"])
    quantized = mq.quantize(model, config)

    rebuilt = round_trip(quantized, mq.quantize(functional_example()[0], config))

    assert torch.equal(run(rebuilt, inputs), run(quantized, inputs))


def test_functional_parameters_without_opt_in_stay_float() -> None:
    model, _ = functional_example()

    quantized = mq.quantize(model, "w8")
    reasons = mq.quantization_report(quantized).summary()["float_layers"]

    assert "QuantConfig(parameters=[...])" in reasons[""]
    assert torch.equal(quantized.proj_weight, model.proj_weight)


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        (["head.weight"], "names only parameters of quantized layers"),
        (["projection"], "'projection' names no parameter"),
    ],
    ids=["inside_quantized_layer", "typo"],
)
def test_functional_parameters_invalid_pattern(patterns: list[str], message: str) -> None:
    model, _ = functional_example()

    with pytest.raises(ValueError, match=message):
        mq.quantize(model, mq.QuantConfig(bits=8, activations=None, parameters=patterns))


def test_recurrent_weights_in_state_dict() -> None:
    model, _ = EXAMPLES["recurrent"]()

    state = mq.quantize(model, "w4").state_dict()

    assert state["lstm.weight_ih_l1_reverse_codes"].dtype == torch.uint8
    assert "lstm.weight_ih_l0" not in state
    assert "gru.bias_hh_l0" in state


def test_select_layers_supported_subset() -> None:
    model, _ = EXAMPLES["recurrent"]()

    decisions = select_layers(model, None, None, supported={nn.Linear})
    by_name = {decision.name: decision for decision in decisions}

    assert by_name["head"].quantize
    assert not by_name["lstm"].quantize
    assert by_name["lstm"].reason == "LSTM is not supported in this mode"
