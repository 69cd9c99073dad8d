"""SensitivityReport.plot(): PNG bar charts of a real sensitivity ranking."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mono_quant as mq
from mono_quant.evaluate.plot import FIGURE_DPI, SQNR_METRIC, figure_size
from mono_quant.evaluate.sensitivity import LayerSensitivity, SensitivityReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> SensitivityReport:
    """A w4 per_tensor sensitivity report of a small MLP on the real digits data."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    batches = [(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]
    config = mq.QuantConfig(bits=4, granularity="per_tensor", activations=None)
    return mq.sensitivity(model.eval(), config, None, batches)


def expected_pixels(num_layers: int) -> tuple[int, int]:
    """Return the ``(height, width)`` in pixels that matplotlib reads back."""
    width, height = figure_size(num_layers)
    return round(height * FIGURE_DPI), round(width * FIGURE_DPI)


@pytest.mark.parametrize(
    "metric", [pytest.param(None, id="monitor"), pytest.param(SQNR_METRIC, id="sqnr")]
)
def test_plot_writes_png(report: SensitivityReport, tmp_path, metric: str | None) -> None:
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "sensitivity.png"

    returned = report.plot(path, metric=metric)

    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.shape[:2] == expected_pixels(len(report.layers))
    # A chart with bars is not one flat color.
    assert float(pixels[..., :3].std()) > 0


def test_plot_accepts_string_path(report: SensitivityReport, tmp_path) -> None:
    pytest.importorskip("matplotlib")

    returned = report.plot(str(tmp_path / "chart.png"))

    assert returned == tmp_path / "chart.png"
    assert returned.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_non_finite_values(tmp_path) -> None:
    image = pytest.importorskip("matplotlib.image")
    layers = [
        LayerSensitivity("exact", "Linear", 10, 30, {"accuracy": 0.0}, math.inf),
        LayerSensitivity("lossy", "Linear", 10, 30, {"accuracy": math.nan}, 12.5),
    ]
    report = SensitivityReport(mq.QuantConfig(bits=8).to_dict(), "accuracy", {"accuracy": 0.9})

    report.layers = layers
    path = report.plot(tmp_path / "inf.png", metric=SQNR_METRIC)
    nan_path = report.plot(tmp_path / "nan.png")

    assert image.imread(path).shape[:2] == expected_pixels(2)
    assert image.imread(nan_path).shape[:2] == expected_pixels(2)


def test_plot_unknown_metric_raises(report: SensitivityReport, tmp_path) -> None:
    with pytest.raises(ValueError, match="metric='f1' is not in this report"):
        report.plot(tmp_path / "chart.png", metric="f1")


def test_plot_empty_report_raises(tmp_path) -> None:
    report = SensitivityReport(mq.QuantConfig().to_dict(), None, {})

    with pytest.raises(ValueError, match="no layers"):
        report.plot(tmp_path / "chart.png")


def test_plot_without_matplotlib_raises(
    report: SensitivityReport, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes every import of that module raise ImportError.
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "chart.png"

    with pytest.raises(ImportError, match=r"pip install 'mono-quant\[plot\]'"):
        report.plot(path)
    assert not path.exists()
