"""mono_quant.export: torch.export programs that run without mono_quant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
from mono_quant.io.export import _foreign_calls

PRESETS = ["w8a8", "w8", "w4", "fp16", "bf16"]


class ConvNet(nn.Module):
    """Conv, Linear and a LayerNorm that stays float."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.head(self.norm(F.relu(self.fc(x))))


def _images(batch: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized(preset: str) -> nn.Module:
    torch.manual_seed(0)
    calibration = [_images(seed=seed) for seed in range(3)]
    return mq.quantize(ConvNet().eval(), preset, calibration_data=calibration).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Quantize ConvNet with every preset and export each; return {preset: (model, path)}."""
    folder = tmp_path_factory.mktemp("exported")
    images = _images()
    result = {}
    for preset in PRESETS:
        model = _quantized(preset)
        result[preset] = (model, mq.export(model, images, folder / f"{preset}.pt2"))
    return result


@pytest.mark.parametrize("preset", PRESETS)
def test_export_matches_model(preset: str, exported) -> None:
    quantized, path = exported[preset]
    images = _images(seed=7)

    program = torch.export.load(path)

    # The exported graph holds the reference path; eager fast kernels round differently.
    with mq.reference_kernels():
        expected = quantized(images)
    assert torch.equal(program.module()(images), expected)
    assert _foreign_calls(program) == []


def test_export_dynamic_batch(tmp_path) -> None:
    quantized = _quantized("w4")
    dynamic = ({0: torch.export.Dim.AUTO},)

    path = mq.export(quantized, (_images(16),), tmp_path / "model.pt2", dynamic_shapes=dynamic)

    program = torch.export.load(path).module()
    for batch in (1, 5, 33):
        images = _images(batch, seed=batch)
        with mq.reference_kernels():
            expected = quantized(images)
        assert torch.equal(program(images), expected), batch


def test_export_static_batch_rejects_other_size(tmp_path) -> None:
    quantized = _quantized("w8")
    path = mq.export(quantized, (_images(16),), tmp_path / "model.pt2")

    with pytest.raises(Exception, match="16"):
        torch.export.load(path).module()(_images(5))


def test_export_dynamic_activations_raise(tmp_path) -> None:
    quantized = _quantized("w8a8-dynamic")

    with pytest.raises(ValueError, match=r"\['conv', 'fc', 'head'\] use dynamic activations"):
        mq.export(quantized, (_images(),), tmp_path / "model.pt2")

    assert not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize("module", [nn.Embedding(100, 16), nn.EmbeddingBag(100, 16)])
def test_export_packed_embedding_checks_range(module: nn.Module, tmp_path) -> None:
    # The traced graph looks rows up in the whole dequantized table, so 4-bit codes export
    # and out-of-range indices raise in the program as they do in the float layer.
    torch.manual_seed(0)
    model = nn.Sequential(module).eval()
    tokens = torch.randint(0, 100, (2, 5))
    other = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    quantized = mq.quantize(model, "w4")

    path = mq.export(quantized, (tokens,), tmp_path / "w4.pt2")
    program = torch.export.load(path).module()

    assert torch.equal(program(other), quantized(other))
    with pytest.raises((IndexError, RuntimeError), match=r"out of range|not in the valid range"):
        program(torch.tensor([[-1, 0, 1, 2, 3], [4, 5, 6, 7, 8]]))


def test_export_restores_training_flags(tmp_path) -> None:
    quantized = _quantized("w8").train()

    mq.export(quantized, (_images(),), tmp_path / "model.pt2")

    assert all(module.training for module in quantized.modules())


def test_export_non_module_raises(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        mq.export("model.pt", (_images(),), tmp_path / "model.pt2")
