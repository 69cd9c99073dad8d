"""sensitivity(): one layer at a time, ranked by what quantizing it costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

import mono_quant as mq


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, list]:
    """An MLP trained on the real digits, with a deliberately sensitive middle layer."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        # One huge weight in an output channel that no sample activates keeps the float model's
        # accuracy but sets a per_tensor scale that rounds the rest of this layer to zero.
        unused = torch.argmin(torch.relu(model[0](x)).sum(0))
        model[2].weight[0, unused] = 200.0
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    return model.eval(), batches


def test_sensitive_layer_ranks_first(digits_mlp) -> None:
    model, batches = digits_mlp
    config = mq.QuantConfig(bits=4, granularity="per_tensor", activations=None)

    report = mq.sensitivity(
        model, config, None, batches, metrics=MulticlassAccuracy(num_classes=10)
    )

    assert report.layers[0].name == "2", str(report)
    assert report.layers[0].metric_change["multiclass_accuracy"] < -0.05
    assert report.layers[0].output_sqnr_db == min(layer.output_sqnr_db for layer in report.layers)


def test_rows_count_bytes_and_parameters(digits_mlp) -> None:
    model, batches = digits_mlp

    report = mq.sensitivity(model, "w8", None, batches)

    rows = {layer.name: layer for layer in report.layers}
    assert set(rows) == {"0", "2", "4"}
    assert rows["0"].parameters == 64 * 64 + 64
    # int8 per_channel: one byte per weight plus a float32 scale per output channel.
    assert rows["0"].bytes_saved == 64 * 64 * 4 - (64 * 64 + 64 * 4)
    assert report.monitor == "accuracy"
    assert "accuracy" in str(report)


def test_lower_is_better_metric_ranks_by_increase(digits_mlp) -> None:
    model, batches = digits_mlp
    # The float model's own logits as targets: its MSE is 0 and quantization can only raise it.
    with torch.no_grad():
        distillation = [(x, model(x)) for x, _ in batches]
    config = mq.QuantConfig(bits=4, granularity="per_tensor", activations=None)

    report = mq.sensitivity(model, config, None, distillation, metrics=MeanSquaredError())

    assert report.layers[0].name == "2"
    assert report.layers[0].metric_change["mean_squared_error"] > 0


def test_unknown_monitor_raises(digits_mlp) -> None:
    model, batches = digits_mlp

    with pytest.raises(ValueError, match="monitor='f1' is not one of the computed metrics"):
        mq.sensitivity(model, "w8", None, batches, monitor="f1")


def test_no_selected_layer_raises(digits_mlp) -> None:
    model, batches = digits_mlp

    with pytest.raises(ValueError, match="selects no layer"):
        mq.sensitivity(model, mq.QuantConfig(bits=8, exclude=["Linear"]), None, batches)


def test_monitor_prefix_accepted(digits_mlp) -> None:
    model, batches = digits_mlp

    report = mq.sensitivity(model, "w8", None, batches, monitor="acc")

    assert report.monitor == "accuracy"
