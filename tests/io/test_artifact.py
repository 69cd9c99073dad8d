"""Saving quantized models and reading them back without unpickling code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.io import read_artifact, save


@pytest.fixture
def quantized() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 4))
    return mq.quantize(model, "w4")


def test_save_then_read_round_trip(quantized: nn.Module, tmp_path) -> None:
    path = save(quantized, tmp_path / "model.pt", metadata={"run": "unit"})

    artifact = read_artifact(path)

    assert artifact["format_version"] == 1
    assert artifact["config"]["bits"] == 4
    assert artifact["metadata"] == {"run": "unit"}
    assert [layer["name"] for layer in artifact["layers"]] == ["0", "2", "3"]
    for key, tensor in quantized.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(artifact["state_dict"][key], tensor), key


def test_save_float_model_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="has no quantization report"):
        save(nn.Linear(4, 4), tmp_path / "float.pt")


def test_read_plain_state_dict_raises(tmp_path) -> None:
    torch.save(nn.Linear(4, 4).state_dict(), tmp_path / "plain.pt")

    with pytest.raises(ValueError, match="is not a mono-quant file"):
        read_artifact(tmp_path / "plain.pt")


def test_read_truncated_file_raises(quantized: nn.Module, tmp_path) -> None:
    path = save(quantized, tmp_path / "model.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])

    with pytest.raises(ValueError, match="truncated"):
        read_artifact(tmp_path / "cut.pt")


def test_read_newer_format_raises(quantized: nn.Module, tmp_path) -> None:
    path = save(quantized, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)

    with pytest.raises(ValueError, match="format_version 99, newer"):
        read_artifact(path)


class ArbitraryObject:
    """A class that a weights-only load must refuse to rebuild."""


def test_read_never_unpickles_objects(tmp_path) -> None:
    torch.save({"format": "mono-quant", "object": ArbitraryObject()}, tmp_path / "evil.pt")

    with pytest.raises(ValueError, match=r"pickled Python object .*ArbitraryObject"):
        read_artifact(tmp_path / "evil.pt")


def test_save_records_layer_classes(quantized: nn.Module, tmp_path) -> None:
    artifact = read_artifact(save(quantized, tmp_path / "model.pt"))

    assert artifact["quantized_types"] == {
        "0": "mono_quant.nn.linear.QuantLinear",
        "3": "mono_quant.nn.linear.QuantLinear",
    }
    assert artifact["mode"] == "ptq"


class ParsedInt(int):
    """An int subclass, like the ones argument parsers return (jsonargparse's PositiveInt)."""


def test_save_stores_int_subclasses_as_int(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 8))
    quantized = mq.quantize(model, mq.QuantConfig(bits=4, group_size=ParsedInt(16)))

    path = save(quantized, tmp_path / "model.pt", metadata={"epochs": ParsedInt(3)})

    artifact = torch.load(path, weights_only=True)
    assert type(artifact["config"]["group_size"]) is int
    assert type(artifact["state_dict"]["0._extra_state"]["group_size"]) is int
    assert type(artifact["metadata"]["epochs"]) is int


def test_save_rejects_object_metadata(quantized: nn.Module, tmp_path) -> None:
    with pytest.raises(TypeError, match=r"metadata\['run'\] has type ArbitraryObject"):
        save(quantized, tmp_path / "model.pt", metadata={"run": ArbitraryObject()})

    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("key", ["config", "layers", "state_dict"])
def test_read_header_without_key_raises(quantized: nn.Module, tmp_path, key: str) -> None:
    path = save(quantized, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    del payload[key]
    torch.save(payload, path)

    with pytest.raises(ValueError, match=f"no \\['{key}'\\]; the file is damaged"):
        read_artifact(path)


def test_read_missing_file_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no mono-quant file"):
        read_artifact(tmp_path / "missing.pt")


def test_read_directory_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="is a directory"):
        read_artifact(tmp_path)


@pytest.mark.parametrize(
    "content", [b"hello\n", b"a\n", b"", b"{}"], ids=["hello", "a", "empty", "json"]
)
def test_read_text_file_raises_value_error(tmp_path, content: bytes) -> None:
    (tmp_path / "notes.txt").write_bytes(content)

    with pytest.raises(ValueError, match="not a readable mono-quant file"):
        read_artifact(tmp_path / "notes.txt")
