"""mono_quant.load: rebuild quantized models on float skeletons, bit-exactly and safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
from mono_quant.io import read_artifact


class ConvNet(nn.Module):
    """Conv, Linear, a LayerNorm that stays float, and a GRU."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.fc = nn.Linear(8 * 6, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).flatten(1)
        return self.head(self.norm(self.fc(x)))


class TiedLanguageModel(nn.Module):
    """Embedding, LSTM, GRU and an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 16, num_layers=2, batch_first=True)
        self.gru = nn.GRU(16, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        hidden, _ = self.gru(hidden)
        return self.head(hidden)


class AttentionModel(nn.Module):
    """Transformer encoder, cross-attention, a transposed conv and a functional parameter."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=8)
        self.up = nn.ConvTranspose1d(16, 4, 3)
        self.mix = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(x)
        context, _ = self.cross(hidden, x[..., :8], x[..., :8])
        return self.up(F.linear(context, self.mix).transpose(1, 2))


def _inputs() -> torch.Tensor:
    return torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(1))


def _quantized(config: mq.QuantConfig | str) -> nn.Module:
    torch.manual_seed(0)
    calibration = [torch.randn(6, 4, 8) for _ in range(3)]
    return mq.quantize(ConvNet().eval(), config, calibration_data=calibration)


PRESETS = ["w8a8", "w8a8-dynamic", "w8", "w4", "fp16", "bf16"]
CONFIGS = [
    mq.QuantConfig(bits=3, symmetric=False, granularity="per_group", group_size=5),
    mq.QuantConfig(bits=2, granularity="per_tensor", activations="static"),
    mq.QuantConfig(bits=6, activations="dynamic", exclude=("head",)),
]


@pytest.mark.parametrize("config", PRESETS + CONFIGS, ids=[*PRESETS, "w3-affine", "w2a8", "w6"])
def test_load_reproduces_outputs(config, tmp_path) -> None:
    quantized = _quantized(config)
    path = mq.save(quantized, tmp_path / "model.pt")

    torch.manual_seed(123)
    loaded = mq.load(path, ConvNet()).eval()

    x = _inputs()
    assert torch.equal(loaded(x), quantized(x))


def test_load_restores_report(tmp_path) -> None:
    quantized = _quantized("w4")
    path = mq.save(quantized, tmp_path / "model.pt")

    loaded = mq.load(path, ConvNet())

    assert mq.quantization_report(loaded) == mq.quantization_report(quantized)


def test_load_then_save_round_trips(tmp_path) -> None:
    quantized = _quantized("w8a8")
    first = read_artifact(mq.save(quantized, tmp_path / "first.pt"))

    loaded = mq.load(tmp_path / "first.pt", ConvNet())
    second = read_artifact(mq.save(loaded, tmp_path / "second.pt"))

    assert second["layers"] == first["layers"]
    assert second["config"] == first["config"]
    for key, value in first["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(second["state_dict"][key], value), key
        else:
            assert second["state_dict"][key] == value, key


def test_load_copies_skeleton_by_default(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    skeleton = ConvNet()

    loaded = mq.load(path, skeleton)

    assert loaded is not skeleton
    assert type(skeleton.fc) is nn.Linear
    assert type(loaded.fc).__name__ == "QuantLinear"


def test_load_inplace_changes_skeleton(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    skeleton = ConvNet()

    loaded = mq.load(path, skeleton, inplace=True)

    assert loaded is skeleton
    assert type(skeleton.fc).__name__ == "QuantLinear"


def test_load_keeps_skeleton_training_mode(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")

    loaded = mq.load(path, ConvNet().eval())

    assert not any(module.training for module in loaded.modules())


def test_load_single_layer_model(tmp_path) -> None:
    torch.manual_seed(0)
    quantized = mq.quantize(nn.Linear(32, 4), "w4")
    path = mq.save(quantized, tmp_path / "model.pt")

    loaded = mq.load(path, nn.Linear(32, 4))

    x = torch.randn(3, 32)
    assert type(loaded).__name__ == "QuantLinear"
    assert torch.equal(loaded(x), quantized(x))


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "fp16"])
def test_load_recurrent_and_tied_layers(preset: str, tmp_path) -> None:
    torch.manual_seed(0)
    quantized = mq.quantize(TiedLanguageModel().eval(), preset)
    path = mq.save(quantized, tmp_path / "model.pt")

    loaded = mq.load(path, TiedLanguageModel()).eval()

    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(tokens), quantized(tokens))


def test_load_keeps_tied_storage_shared(tmp_path) -> None:
    torch.manual_seed(0)
    quantized = mq.quantize(TiedLanguageModel().eval(), "w4")
    assert quantized.head.weight_codes is quantized.embed.weight_codes
    path = mq.save(quantized, tmp_path / "model.pt")

    loaded = mq.load(path, TiedLanguageModel()).eval()

    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    assert loaded.head.weight_codes is loaded.embed.weight_codes
    assert loaded.head.weight_scale is loaded.embed.weight_scale
    assert torch.equal(loaded(tokens), quantized(tokens))


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w4"])
def test_load_attention_and_parameters(preset: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = mq.QuantConfig.from_preset(preset, parameters=("mix",))
    # convert builds new layers in training mode, and attention dropout needs eval mode.
    quantized = mq.quantize(AttentionModel().eval(), config).eval()
    path = mq.save(quantized, tmp_path / "model.pt")

    loaded = mq.load(path, AttentionModel()).eval()

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    assert "mix" in [row.name for row in mq.quantization_report(loaded).quantized_layers]


class Hidden32(ConvNet):
    def __init__(self) -> None:
        super().__init__(hidden=32)


class ConvSwapped(ConvNet):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)


class NoHead(ConvNet):
    def __init__(self) -> None:
        super().__init__()
        del self.head


class ExtraLayer(ConvNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("skeleton", "message"),
    [
        (Hidden32, r"layer 'fc' has weight 'weight' of shape \[32, 48\] but the file stores"),
        (ConvSwapped, "layer 'conv' is a Conv1d in the file but a Conv2d"),
        (NoHead, "layer 'head' .* has no such layer"),
        (ExtraLayer, r"unexpected keys \[\]|missing keys \['extra.bias', 'extra.weight'\]"),
    ],
    ids=["weight-shape", "layer-type", "missing-layer", "extra-layer"],
)
def test_load_architecture_mismatch_raises(skeleton, message: str, tmp_path) -> None:
    path = mq.save(_quantized("w8a8"), tmp_path / "model.pt")

    with pytest.raises(ValueError, match=message) as error:
        mq.load(path, skeleton())

    assert "same class and constructor arguments" in str(error.value)
    assert str(path) in str(error.value)


def test_load_float_layer_mismatch_raises(tmp_path) -> None:
    quantized = _quantized(mq.QuantConfig(bits=8, activations=None, exclude=("fc",)))
    path = mq.save(quantized, tmp_path / "model.pt")
    skeleton = ConvNet()
    skeleton.fc = nn.Linear(48, 16, bias=False)

    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['fc.bias'\]"):
        mq.load(path, skeleton)


def test_load_inplace_mismatch_keeps_skeleton(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    skeleton = NoHead()

    with pytest.raises(ValueError):
        mq.load(path, skeleton, inplace=True)

    assert type(skeleton.fc) is nn.Linear


def test_load_quantized_skeleton_raises(tmp_path) -> None:
    quantized = _quantized("w8")
    path = mq.save(quantized, tmp_path / "model.pt")

    with pytest.raises(ValueError, match=r"already prepared or quantized .* pass a float model"):
        mq.load(path, quantized)


def test_load_non_module_raises(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")

    with pytest.raises(TypeError, match=r"model must be a float nn.Module .* got dict"):
        mq.load(path, {})


def test_load_unknown_config_field_raises(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["future_option"] = 1
    torch.save(payload, path)

    with pytest.raises(ValueError, match=r"fields \['future_option'\] .* upgrade mono_quant"):
        mq.load(path, ConvNet())


def test_load_other_layer_class_raises(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["quantized_types"]["fc"] = "other.package.FastLinear"
    torch.save(payload, path)

    with pytest.raises(ValueError, match=r"saved as other\.package\.FastLinear, but this"):
        mq.load(path, ConvNet())


@pytest.mark.parametrize(
    ("write", "error", "message"),
    [
        (lambda p: torch.save(ConvNet().state_dict(), p), ValueError, "is not a mono-quant file"),
        (lambda p: p.write_bytes(b"\x80\x02garbage"), ValueError, "not a readable mono-quant file"),
        (lambda p: None, FileNotFoundError, "no mono-quant file at"),
    ],
    ids=["plain-state-dict", "garbage", "missing"],
)
def test_load_foreign_file_raises(write, error, message: str, tmp_path) -> None:
    path = tmp_path / "model.pt"
    write(path)

    with pytest.raises(error, match=message):
        mq.load(path, ConvNet())


def test_load_truncated_file_raises(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:-300])

    with pytest.raises(ValueError, match="truncated"):
        mq.load(path, ConvNet())


def test_load_newer_format_raises(tmp_path) -> None:
    path = mq.save(_quantized("w8"), tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 2
    torch.save(payload, path)

    with pytest.raises(ValueError, match=r"format_version 2, newer .* upgrade mono_quant"):
        mq.load(path, ConvNet())


class MakeMarker:
    """Pickle payload: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_payload_is_live(tmp_path) -> None:
    # Shows that the payload in the next test would run if anything unpickled it fully.
    marker = tmp_path / "ran"
    torch.save({"payload": MakeMarker(marker)}, tmp_path / "payload.pt")

    torch.load(tmp_path / "payload.pt", weights_only=False)

    assert marker.exists()


def test_load_never_runs_pickle_payload(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    header = read_artifact(mq.save(_quantized("w8"), path))
    header["state_dict"] = MakeMarker(marker)
    torch.save(header, path)

    with pytest.raises(ValueError, match=r"pickled Python object \(\w+\.mkdir\)") as error:
        mq.load(path, ConvNet())

    assert not marker.exists()
    assert "never runs code stored in a file" in str(error.value)
    assert "weights_only=False" not in str(error.value)
