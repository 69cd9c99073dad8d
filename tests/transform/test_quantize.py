"""prepare / calibrate / convert / quantize over whole models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.nn import CastLayer, QuantConv2d, QuantizedLayer, QuantLinear


class MixedNet(nn.Module):
    """A model with supported layers, a normalization layer and an unsupported recurrent layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.norm(self.conv(x)))
        sequence, _ = self.rnn(features.flatten(2).transpose(1, 2))
        return self.head(sequence.flatten(1))


def _batches(count: int = 4, batch_size: int = 16, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch_size,)))
        for _ in range(count)
    ]


@pytest.fixture
def model() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet().eval()


def _types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic", "w8", "w4", "fp16", "bf16"])
def test_quantize_preset_swaps_supported_layers(model: MixedNet, preset: str) -> None:
    quantized = mq.quantize(model, preset, calibration_data=_batches())
    expected = CastLayer if preset in ("fp16", "bf16") else QuantizedLayer

    assert isinstance(quantized.conv, expected)
    assert isinstance(quantized.head[0], expected)
    assert isinstance(quantized.head[2], expected)
    assert type(quantized.norm) is nn.BatchNorm2d
    assert isinstance(quantized.rnn, expected)


@pytest.mark.parametrize(
    ("preset", "min_sqnr_db"), [("w8a8", 30.0), ("w8a8-dynamic", 30.0), ("w8", 35.0), ("w4", 12.0)]
)
def test_quantize_output_close_to_float(model: MixedNet, preset: str, min_sqnr_db: float) -> None:
    data = _batches()
    quantized = mq.quantize(model, preset, calibration_data=data)

    report = mq.compare(model, quantized, data)

    assert report.output_sqnr_db >= min_sqnr_db, f"{preset}: SQNR {report.output_sqnr_db:.1f} dB"


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic", "w8", "w4"])
@pytest.mark.parametrize("layer", ["conv", "head"])
def test_integer_input_names_layer(model: MixedNet, preset: str, layer: str) -> None:
    # Casting the weight to an integer input's dtype would truncate it to zeros.
    quantized = mq.quantize(model, preset, calibration_data=_batches())
    shape = (4, 1, 8, 8) if layer == "conv" else (4, 8 * 64)
    x = torch.randint(0, 16, shape)
    name = "conv" if layer == "conv" else "head.0"

    with torch.no_grad(), pytest.raises(TypeError, match=rf"'{name}' is torch.int64.*x\.float\(\)"):
        getattr(quantized, layer)(x)


def test_dynamic_nan_input_raises_public_error(model: MixedNet) -> None:
    quantized = mq.quantize(model, "w8a8-dynamic")
    x = torch.randn(4, 8 * 64)
    x[1, 3] = math.nan

    with torch.no_grad(), pytest.raises(mq.NonFiniteError, match=r"QuantLinear 'head\.0'"):
        quantized.head(x)


def test_quantize_leaves_float_model_unchanged(model: MixedNet) -> None:
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    mq.quantize(model, "w8a8", calibration_data=_batches())

    assert _types(model)["conv"] is nn.Conv2d
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_quantize_inplace_changes_model(model: MixedNet) -> None:
    quantized = mq.quantize(model, "w8", inplace=True)

    assert quantized is model
    assert isinstance(model.conv, QuantConv2d)


def test_quantize_single_layer_root() -> None:
    layer = nn.Linear(16, 4)

    quantized = mq.quantize(layer, "w8")

    assert isinstance(quantized, QuantLinear)
    assert mq.quantization_report(quantized).summary()["layers_quantized"] == 1


def test_report_lists_float_layers_with_reason(model: MixedNet) -> None:
    quantized = mq.quantize(model, "w8")

    reasons = mq.quantization_report(quantized).summary()["float_layers"]

    assert reasons["norm"] == "normalization layers stay in float"
    assert "rnn" not in reasons


def test_report_weight_bytes_match_buffers(model: MixedNet) -> None:
    quantized = mq.quantize(model, "w4")
    rows = {row.name: row for row in mq.quantization_report(quantized).quantized_layers}

    layer = quantized.head[0]
    stored = sum(
        t.numel() * t.element_size()
        for t in (layer.weight_codes, layer.weight_scale, layer.weight_zero_point)
        if t is not None
    )

    assert rows["head.0"].quantized_bytes == stored
    assert rows["head.0"].float_bytes == model.head[0].weight.numel() * 4


def test_report_notes_short_last_group(model: MixedNet) -> None:
    quantized = mq.quantize(model, mq.QuantConfig(bits=4, group_size=4))

    rows = {row.name: row for row in mq.quantization_report(quantized).layers}

    assert "rows of 9 weights are not a multiple of group_size 4" in rows["conv"].reason
    assert rows["head.0"].reason == ""


def test_report_notes_row_shorter_than_group(model: MixedNet) -> None:
    quantized = mq.quantize(model, mq.QuantConfig(bits=4, group_size=32))

    rows = {row.name: row for row in mq.quantization_report(quantized).layers}

    assert "shorter than group_size 32, so each row is one group" in rows["conv"].reason


@pytest.mark.parametrize(
    ("field", "patterns", "float_layers"),
    [
        ("exclude", ["head.*"], {"head.0", "head.2"}),
        ("exclude", ["Conv2d"], {"conv"}),
        ("include", ["head.2"], {"conv", "head.0"}),
        ("include", ["Linear"], {"conv"}),
    ],
    ids=["exclude-glob", "exclude-type", "include-name", "include-type"],
)
def test_layer_selection(model: MixedNet, field: str, patterns: list, float_layers: set) -> None:
    config = mq.QuantConfig(bits=8, activations=None, **{field: patterns})

    quantized = mq.quantize(model, config)

    kept = {
        row.name
        for row in mq.quantization_report(quantized).float_layers
        if row.type_name in ("Conv2d", "Linear")
    }
    assert kept == float_layers
    for name in float_layers:
        assert not isinstance(quantized.get_submodule(name), QuantizedLayer), name


def test_prepare_calibrate_convert_steps(model: MixedNet) -> None:
    data = _batches()

    prepared = mq.prepare(model, "w8a8")
    count = mq.calibrate(prepared, data, max_batches=2)
    quantized = mq.convert(prepared)

    assert count == 2
    assert quantized.conv.input_scale.shape == ()
    assert float(quantized.conv.input_scale) > 0


def test_static_input_range_covers_calibration_data(model: MixedNet) -> None:
    data = _batches()
    quantized = mq.quantize(model, "w8a8", calibration_data=data)
    inputs = torch.cat([x for x, _ in data])

    layer = quantized.conv
    low = (0 - float(layer.input_zero_point)) * float(layer.input_scale)
    high = (255 - float(layer.input_zero_point)) * float(layer.input_scale)

    step = float(layer.input_scale)
    assert low <= float(inputs.min()) + step / 2
    assert high >= float(inputs.max()) - step / 2


def test_mapping_batches_calibrate(model: MixedNet) -> None:
    data = [{"input": x, "target": y} for x, y in _batches()]

    quantized = mq.quantize(model, "w8a8", calibration_data=data)

    assert isinstance(quantized.conv, QuantConv2d)


def test_static_without_calibration_data_raises(model: MixedNet) -> None:
    with pytest.raises(ValueError, match="pass calibration_data"):
        mq.quantize(model, "w8a8")


def test_empty_calibration_loader_raises(model: MixedNet) -> None:
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8)))

    with pytest.raises(ValueError, match="yielded no batches"):
        mq.quantize(model, "w8a8", calibration_data=empty)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_calibration_data_names_layer(model: MixedNet, bad: float) -> None:
    data = _batches(count=1)
    data[0][0][0, 0, 0, 0] = bad

    with pytest.raises(ValueError, match=r"input of layer 'conv'.*(NaN|infinite)"):
        mq.quantize(model, "w8a8", calibration_data=data)


def test_unsupported_batch_format_raises(model: MixedNet) -> None:
    with pytest.raises(TypeError, match="collate_fn"):
        mq.quantize(model, "w8a8", calibration_data=[{"pixels": torch.randn(2, 1, 8, 8)}])


@pytest.mark.parametrize("bits", [1, 9, 12, 32])
def test_unsupported_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
        mq.QuantConfig(bits=bits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 4, "group_size": -1}, "group_size=-1 must be positive"),
        ({"bits": 4, "group_size": 0}, "group_size=0 must be positive"),
        ({"granularity": "per_chanel"}, "granularity='per_chanel' is not a weight granularity"),
        ({"granularity": "per_token"}, "per_token applies to dynamic activations only"),
        ({"granularity": "per_channel", "group_size": 32}, "only used with granularity"),
        ({"observer": "histogram"}, "observer='histogram' is not a known observer"),
        ({"activations": "always"}, "activations='always' is not one of"),
        ({"bits": 16, "activations": "static"}, "needs integer weights"),
        ({"dtype": "float16"}, "set bits=16"),
        ({"exclude": [""]}, "non-empty strings"),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        mq.QuantConfig(**kwargs)


@pytest.mark.parametrize(
    ("bits", "activations", "granularity", "group_size"),
    [(8, "static", "per_channel", None), (4, None, "per_group", 32), (2, None, "per_group", 32)],
)
def test_config_auto_values_follow_bits(bits, activations, granularity, group_size) -> None:
    config = mq.QuantConfig(bits=bits)

    assert config.activations == activations
    assert config.granularity == granularity
    assert config.group_size == group_size


def test_config_preset_and_unknown_preset() -> None:
    assert mq.QuantConfig.from_preset("w8a8-dynamic").activations == "dynamic"
    with pytest.raises(ValueError, match="unknown preset 'w3'"):
        mq.QuantConfig.from_preset("w3")


def test_unreached_layer_stays_float_with_warning() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.warns(UserWarning, match="never called during calibration"):
        quantized = mq.quantize(Branchy(), "w8a8", calibration_data=[torch.randn(2, 4)])

    assert isinstance(quantized.used, QuantLinear)
    assert type(quantized.unused) is nn.Linear


def test_prepare_twice_raises(model: MixedNet) -> None:
    prepared = mq.prepare(model, "w8")

    with pytest.raises(ValueError, match="already prepared"):
        mq.prepare(prepared, "w8")


def test_convert_unprepared_raises(model: MixedNet) -> None:
    with pytest.raises(ValueError, match="is not prepared"):
        mq.convert(model)


def test_quantized_state_dict_loads_weights_only(model: MixedNet, tmp_path) -> None:
    quantized = mq.quantize(model, "w4")
    torch.save(quantized.state_dict(), tmp_path / "state.pt")

    state = torch.load(tmp_path / "state.pt", weights_only=True)
    rebuilt = mq.quantize(MixedNet().eval(), "w4")
    rebuilt.load_state_dict(state, strict=True)

    x = _batches(count=1)[0][0]
    assert torch.equal(rebuilt(x), quantized(x))


def test_calibration_batches_zero_raises(model: MixedNet) -> None:
    with pytest.raises(ValueError, match="calibration_batches=0 must be a positive number"):
        mq.quantize(model, "w8a8", calibration_data=_batches(), calibration_batches=0)


def test_wrong_shape_calibration_batch_names_batch(model: MixedNet) -> None:
    data = _batches(count=2)
    data[1] = (torch.randn(4, 3, 8, 8), data[1][1])

    with pytest.raises(RuntimeError, match=r"calibration batch 1 failed in MixedNet\.forward"):
        mq.quantize(model, "w8a8", calibration_data=data)


def test_include_matching_nothing_warns(model: MixedNet) -> None:
    config = mq.QuantConfig(bits=8, activations=None, include=["decoder.*"])

    with pytest.warns(UserWarning, match=r"no layer of MixedNet was selected.*decoder"):
        mq.quantize(model, config)


def test_linear_subclass_stays_float_with_reason() -> None:
    class ScaledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledLinear(16, 4))
    x = torch.randn(2, 16)

    quantized = mq.quantize(model, "w8")

    reasons = mq.quantization_report(quantized).summary()["float_layers"]
    assert "subclasses Linear" in reasons["0"]
    assert torch.equal(quantized(x), model(x))


def test_load_other_layout_names_layer(model: MixedNet) -> None:
    state = mq.quantize(model, "w4").state_dict()
    target = mq.quantize(MixedNet().eval(), "w8")

    with pytest.raises(ValueError, match=r"layer 'conv': .*bits: saved 4, layer 8"):
        target.load_state_dict(state)
