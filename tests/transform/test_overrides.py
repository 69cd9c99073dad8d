"""QuantConfig.overrides: per-layer formats through prepare, convert, save and load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.transform.qat import prepare_qat


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=generator) for _ in range(3)]


CONFIG = mq.QuantConfig(
    bits=4,
    overrides={"0": {"bits": 8, "granularity": "per_channel", "activations": "static"}, "4": None},
)


def test_layers_get_their_own_format() -> None:
    quantized = mq.quantize(_model(), CONFIG, _batches())

    rows = {row.name: row for row in mq.quantization_report(quantized).layers}
    assert rows["0"].format == "w8a8 static, per_channel"
    assert rows["2"].format == "w4 weight-only, per_group 32"
    assert not rows["4"].quantized
    assert rows["4"].reason == "kept in float by override '4'"
    assert isinstance(quantized[4], nn.Linear)


def test_static_override_needs_calibration() -> None:
    with pytest.raises(ValueError, match="calibration data"):
        mq.quantize(_model(), CONFIG)


def test_override_error_within_one_step() -> None:
    model = _model()
    x = _batches()[0]
    quantized = mq.quantize(model, CONFIG.replace(overrides={"0": {"bits": 8}}))

    # Only layer 0's weights change from w4 to w8 per_group, so its output error is bounded by
    # half an int8 step per weight, summed over the inputs.
    layer = quantized[0]
    step = layer.weight_scale.max()
    bound = step / 2 * x.abs().sum(1).max()
    assert (layer(x) - model[0](x)).abs().max() <= bound


def test_class_name_pattern_and_first_match_wins() -> None:
    config = mq.QuantConfig(bits=4, overrides={"4": None, "Linear": {"bits": 8}})

    quantized = mq.quantize(_model(), config)

    rows = {row.name: row for row in mq.quantization_report(quantized).layers}
    assert rows["0"].format.startswith("w8")
    assert not rows["4"].quantized


def test_unused_pattern_rejected() -> None:
    config = mq.QuantConfig(bits=4, overrides={"classifier": None})
    with pytest.raises(ValueError, match=r"\['classifier'\] take effect on no layer"):
        mq.quantize(_model(), config)


def test_round_trip_keeps_each_format(tmp_path) -> None:
    quantized = mq.quantize(_model(), CONFIG, _batches())
    path = tmp_path / "model.pt"
    mq.save(quantized, path)

    loaded = mq.load(path, _model())

    x = _batches()[0]
    assert torch.equal(loaded(x), quantized(x))
    assert isinstance(loaded[4], nn.Linear)
    assert mq.quantization_report(loaded).layers[0].format == "w8a8 static, per_channel"


def test_config_round_trips_through_dict() -> None:
    values = CONFIG.to_dict()

    assert values["overrides"]["4"] is None
    assert mq.QuantConfig(**values) == CONFIG
    assert CONFIG.for_layer("2").label == "w4 weight-only, per_group 32"


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"0": {"include": ["x"]}}, ValueError, "cannot vary by layer"),
        ({"0": {"bits": 9}}, ValueError, r"overrides\['0'\]: bits=9"),
        ({"0": 8}, TypeError, "mapping of field changes"),
        (["0"], TypeError, "must map layer name globs"),
    ],
    ids=["selection-field", "bad-bits", "not-a-mapping", "list"],
)
def test_bad_overrides(overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        mq.QuantConfig(bits=4, overrides=overrides)


def test_qat_rejects_overrides() -> None:
    with pytest.raises(ValueError, match="QAT uses one config"):
        prepare_qat(_model(), CONFIG)


def test_float_string_and_bits16_override() -> None:
    config = mq.QuantConfig(bits=4, overrides={"0": "float", "2": {"bits": 16}})

    quantized = mq.quantize(_model(), config)

    rows = {row.name: row for row in mq.quantization_report(quantized).layers}
    assert not rows["0"].quantized
    assert rows["2"].format == "float16"
