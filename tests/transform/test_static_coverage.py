"""quantize() with static (calibrated) activations on one small model per module type.

Layers that cannot use calibrated input ranges are converted anyway: embeddings weight-only,
recurrent and attention layers with dynamic activations, each with a note in the report.
"""

from __future__ import annotations

import io

import pytest
import torch
from tests.transform.coverage_models import EXAMPLES, functional_example

import mono_quant as mq
from mono_quant.nn import QuantizedLayer

# Static per-tensor int8 activations on random-init models; floors, not typical values.
MIN_STATIC_SQNR_DB = 20.0

# Notes the report must carry for layers that fall back from static activations.
FALLBACK_NOTES = {
    "embedding": {"tokens": "integer indices", "bag": "integer indices"},
    "recurrent": {"lstm": "dynamically", "gru": "dynamically"},
    "attention": {"attention": "dynamically"},
    "transformer": {"encoder.layers.0.self_attn": "dynamically"},
    "tied": {"embedding": "integer indices", "lstm": "dynamically"},
}


def calibration_batches(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    (x,) = inputs
    return [x[:2], x[2:]]


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_static_converts_every_layer(example: str) -> None:
    model, inputs = EXAMPLES[example]()

    quantized = mq.quantize(model, "w8a8", calibration_data=calibration_batches(inputs))
    report = mq.quantization_report(quantized)
    rows = {row.name: row for row in report.layers}

    with torch.no_grad():
        measured = mq.sqnr_db(model(*inputs), quantized(*inputs))
    assert measured >= MIN_STATIC_SQNR_DB, f"{example}: {measured:.1f} dB"
    for row in report.layers:
        if row.quantized:
            assert isinstance(quantized.get_submodule(row.name), QuantizedLayer), row.name
    for name, note in FALLBACK_NOTES.get(example, {}).items():
        assert rows[name].quantized, name
        assert note in rows[name].reason, name


@pytest.mark.parametrize("example", ["hand_attention", "upsampling", "transformer"])
def test_static_linear_and_conv_calibrated(example: str) -> None:
    model, inputs = EXAMPLES[example]()

    quantized = mq.quantize(model, "w8a8", calibration_data=calibration_batches(inputs))
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLayer)]

    static = [layer for layer in layers if layer.activations == "static"]
    assert static
    for layer in static:
        assert float(layer.input_scale) > 0


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_static_state_dict_round_trip(example: str) -> None:
    model, inputs = EXAMPLES[example]()
    data = calibration_batches(inputs)
    quantized = mq.quantize(model, "w8a8", calibration_data=data)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = mq.quantize(EXAMPLES[example]()[0], "w8a8", calibration_data=data)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True), strict=True)

    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), quantized(*inputs))


def test_static_functional_parameters_weight_only() -> None:
    model, inputs = functional_example()
    config = mq.QuantConfig.from_preset("w8a8", parameters=["proj_weight"])

    quantized = mq.quantize(model, config, calibration_data=calibration_batches(inputs))
    rows = {row.name: row for row in mq.quantization_report(quantized).layers}

    assert rows["proj_weight"].format == "w8 weight-only, per_channel"
    assert "weight-only" in rows["proj_weight"].reason
    assert rows["head"].format == "w8a8 static, per_channel"
    with torch.no_grad():
        assert mq.sqnr_db(model(*inputs), quantized(*inputs)) >= MIN_STATIC_SQNR_DB
