"""quantize(..., max_metric_drop=...): widen the most sensitive layers until the budget holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

import mono_quant as mq

# int4 per_tensor weight-only: coarse enough that one outlier weight ruins its layer.
INT4 = mq.QuantConfig(bits=4, granularity="per_tensor", activations=None)
BUDGET = 0.02


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, list]:
    """A 4-layer MLP trained on the real digits with a deliberately sensitive second layer."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        # A huge weight on an input that no sample activates leaves the float model as it was,
        # but sets a per_tensor scale that rounds the rest of layer "2" to zero.
        unused = torch.argmin(torch.relu(model[0](x)).sum(0))
        model[2].weight[0, unused] = 200.0
    batches = [(x[i : i + 300], y[i : i + 300]) for i in range(0, len(x), 300)]
    return model.eval(), batches


def _accuracy(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_budget_beats_first_last_float(digits) -> None:
    model, batches = digits
    float_accuracy = _accuracy(model, batches)
    everywhere = mq.quantize(model, INT4)
    first_last = mq.quantize(model, INT4.replace(exclude=("0", "6")))

    quantized = mq.quantize(model, INT4, None, max_metric_drop=BUDGET, eval_data=batches)
    report = mq.budget_report(quantized)

    assert float_accuracy - _accuracy(everywhere, batches) > BUDGET
    assert report.met, str(report)
    assert float_accuracy - _accuracy(quantized, batches) <= BUDGET + 1e-9
    assert [move.name for move in report.moved] == ["2"], str(report)
    assert len(report.moved) < 2  # keeping the first and last layer in float widens two
    assert float_accuracy - _accuracy(first_last, batches) > BUDGET
    assert report.size_bytes < report.float_size_bytes
    assert report.monitor == "accuracy"


def test_report_matches_the_model(digits) -> None:
    model, batches = digits

    quantized, report = mq.quantize_with_budget(
        model,
        INT4,
        None,
        batches,
        BUDGET,
        metrics=MulticlassAccuracy(num_classes=10, average="micro"),
    )

    layers = {row.name: row for row in mq.quantization_report(quantized).layers}
    assert report.monitor == "multiclass_accuracy"
    assert report.metric == pytest.approx(_accuracy(quantized, batches))
    assert report.float_metric == pytest.approx(_accuracy(model, batches))
    # int4 -> int8 per channel sufficed, so the moved layer is int8 and nothing is float.
    assert layers["2"].format.startswith("w8"), layers["2"]
    assert all(layers[name].format.startswith("w4") for name in ("0", "4", "6"))
    assert report.summary()["moved"][0]["name"] == "2"
    assert "budget met" in str(report)


def test_monitor_prefix_and_direction(digits) -> None:
    model, batches = digits
    with torch.no_grad():
        distillation = [(x, model(x)) for x, _ in batches]

    _, report = mq.quantize_with_budget(
        model, INT4, None, distillation, 0.5, metrics=MeanSquaredError(), monitor="mean"
    )

    assert report.monitor == "mean_squared_error"
    assert report.higher_is_better is False
    assert report.met
    assert report.drop == pytest.approx(report.metric - report.float_metric)


def test_no_mix_meets_budget_warns_and_names_dominant(digits) -> None:
    model, batches = digits
    # A ladder without float cannot undo the outlier's damage at 2 bits everywhere.
    config = mq.QuantConfig(bits=2, granularity="per_tensor", activations=None)
    ladder = [{"bits": 3}]

    with pytest.warns(UserWarning, match="No mix met the metric budget"):
        quantized, report = mq.quantize_with_budget(
            model, config, None, batches, 0.0, ladder=ladder
        )

    assert not report.met
    assert report.dominant and report.dominant[0] == "2", str(report)
    assert report.drop <= report.base_drop
    assert mq.budget_report(quantized) is report
    assert "NOT met" in str(report)


def test_zero_drop_when_base_meets_budget(digits) -> None:
    model, batches = digits

    _, report = mq.quantize_with_budget(model, "w8", None, batches, 0.05)

    assert report.met
    assert report.moved == []
    assert report.evaluations == 1
    assert report.sensitivity is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_metric_drop": -0.1}, ValueError, "at least 0"),
        ({"max_metric_drop": "1%"}, TypeError, "must be a number"),
        ({"max_metric_drop": 0.01, "monitor": "f1"}, ValueError, "not one of the computed"),
        ({"max_metric_drop": 0.01, "inplace": True}, ValueError, "inplace"),
        ({"monitor": "accuracy"}, ValueError, "only apply to a metric budget"),
    ],
    ids=["negative", "string", "unknown-monitor", "inplace", "monitor-without-budget"],
)
def test_bad_arguments(digits, kwargs, error, match) -> None:
    model, batches = digits
    kwargs = {"eval_data": batches, **kwargs}
    if "max_metric_drop" not in kwargs:
        kwargs.pop("eval_data")
    with pytest.raises(error, match=match):
        mq.quantize(model, INT4, batches, **kwargs)


def test_overrides_with_budget_rejected(digits) -> None:
    model, batches = digits
    config = INT4.replace(overrides={"0": None})

    with pytest.raises(ValueError, match="overrides must be empty"):
        mq.quantize_with_budget(model, config, None, batches, 0.01)
