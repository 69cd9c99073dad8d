import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanSquaredError

from mono_quant.evaluate import ComparisonReport, compare, model_size_bytes, sqnr_db

NUM_FEATURES = 8
NUM_CLASSES = 4
NUM_SAMPLES = 96
BATCH_SIZE = 32
# Accuracy and agreement are counts divided by NUM_SAMPLES, so only float32 rounding differs.
FIGURE_TOLERANCE = 1e-6


def make_classifier(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(NUM_FEATURES, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def perturbed_copy(model: nn.Module, noise_std: float, seed: int = 1) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(noise_std * torch.randn(parameter.shape, generator=generator))
    return noisy


def make_data(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(NUM_SAMPLES, NUM_FEATURES, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,), generator=generator)
    return inputs, targets


def make_loader(inputs: torch.Tensor, targets: torch.Tensor | None = None) -> DataLoader:
    dataset = TensorDataset(inputs) if targets is None else TensorDataset(inputs, targets)
    return DataLoader(dataset, batch_size=BATCH_SIZE)


def hand_accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(inputs).argmax(dim=1) == targets).float().mean().item()


# sqnr_db


def test_sqnr_matches_formula_for_known_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1000, generator=generator)
    noise = 0.01 * torch.randn(1000, generator=generator)

    reference64 = reference.double()
    error64 = reference64 - (reference + noise).double()
    expected = 10 * math.log10(reference64.square().sum().item() / error64.square().sum().item())

    assert sqnr_db(reference, reference + noise) == pytest.approx(expected, rel=1e-12)


def test_sqnr_of_uniform_rounding_matches_theory() -> None:
    generator = torch.Generator().manual_seed(0)
    signal = torch.rand(200_000, generator=generator, dtype=torch.float64) * 2 - 1
    step = 2 / 255
    rounded = torch.round(signal / step) * step

    # Uniform rounding error has variance step**2 / 12, and U(-1, 1) has variance 1/3.
    expected = 10 * math.log10((1 / 3) / (step**2 / 12))

    assert sqnr_db(signal, rounded) == pytest.approx(expected, abs=0.1)


def test_sqnr_identical_is_inf() -> None:
    tensor = torch.randn(3, 5)

    assert sqnr_db(tensor, tensor.clone()) == math.inf


def test_sqnr_zero_reference_is_minus_inf() -> None:
    assert sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf


def test_sqnr_nan_input_is_nan() -> None:
    test = torch.tensor([1.0, float("nan")])

    assert math.isnan(sqnr_db(torch.ones(2), test))


def test_sqnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(torch.ones(4), torch.ones(2, 2))


# compare


def test_compare_identical_models() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    report = compare(model, copy.deepcopy(model), make_loader(inputs, targets))

    assert report.float_metrics == report.quantized_metrics
    assert "accuracy" in report.float_metrics
    assert report.top1_agreement == 1.0
    assert report.output_sqnr_db == math.inf
    assert report.max_abs_error == 0.0
    assert report.num_samples == NUM_SAMPLES
    assert report.num_batches == math.ceil(NUM_SAMPLES / BATCH_SIZE)


def test_compare_perturbed_model_matches_hand_figures() -> None:
    model = make_classifier()
    noisy = perturbed_copy(model, noise_std=0.5)
    inputs, targets = make_data()

    report = compare(model, noisy, make_loader(inputs, targets))

    with torch.no_grad():
        float_logits = model(inputs)
        noisy_logits = noisy(inputs)
    agreement = (float_logits.argmax(dim=1) == noisy_logits.argmax(dim=1)).float().mean().item()
    float_accuracy = hand_accuracy(model, inputs, targets)
    noisy_accuracy = hand_accuracy(noisy, inputs, targets)

    assert report.top1_agreement < 1.0
    assert report.top1_agreement == pytest.approx(agreement, abs=FIGURE_TOLERANCE)
    assert report.float_metrics["accuracy"] == pytest.approx(float_accuracy, abs=FIGURE_TOLERANCE)
    assert report.quantized_metrics["accuracy"] == pytest.approx(
        noisy_accuracy, abs=FIGURE_TOLERANCE
    )
    assert report.output_sqnr_db == pytest.approx(sqnr_db(float_logits, noisy_logits), rel=1e-9)
    assert report.max_abs_error == pytest.approx(
        (float_logits - noisy_logits).abs().max().item(), rel=1e-6
    )


def test_compare_sqnr_drops_with_more_noise() -> None:
    model = make_classifier()
    inputs, targets = make_data()
    loader = make_loader(inputs, targets)

    small = compare(model, perturbed_copy(model, noise_std=0.01), loader)
    large = compare(model, perturbed_copy(model, noise_std=0.1), loader)

    assert small.output_sqnr_db > large.output_sqnr_db


def test_compare_collection_keys_in_summary() -> None:
    model = make_classifier()
    inputs, targets = make_data()
    metrics = MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro"),
            "f1": MulticlassF1Score(num_classes=NUM_CLASSES, average="macro"),
        }
    )

    report = compare(model, perturbed_copy(model, 0.2), make_loader(inputs, targets), metrics)
    summary = report.summary()

    for key in ("acc", "f1"):
        assert f"float/{key}" in summary
        assert f"quantized/{key}" in summary
        assert summary[f"delta/{key}"] == pytest.approx(
            summary[f"quantized/{key}"] - summary[f"float/{key}"]
        )


def test_compare_leaves_caller_metric_untouched() -> None:
    model = make_classifier()
    inputs, targets = make_data()
    metric = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    compare(model, model, make_loader(inputs, targets), metric)

    assert metric.update_count == 0


def test_compare_single_metric_named_in_snake_case() -> None:
    model = make_classifier()
    inputs, targets = make_data()
    metric = MulticlassF1Score(num_classes=NUM_CLASSES, average="macro")

    report = compare(model, model, make_loader(inputs, targets), metric)

    assert list(report.float_metrics) == ["multiclass_f1_score"]
    assert "multiclass_f1_score" in str(report)


def test_compare_rejects_non_scalar_metric() -> None:
    model = make_classifier()
    inputs, targets = make_data()
    metric = MulticlassAccuracy(num_classes=NUM_CLASSES, average=None)

    with pytest.raises(ValueError, match=r"multiclass_accuracy.*scalar metric"):
        compare(model, model, make_loader(inputs, targets), metric)


def test_compare_metric_without_target_raises() -> None:
    model = make_classifier()
    inputs, _ = make_data()
    metric = MulticlassAccuracy(num_classes=NUM_CLASSES)

    with pytest.raises(ValueError, match=r"need \(input, target\) batches"):
        compare(model, model, [inputs], metric)


def test_compare_empty_dataloader_raises() -> None:
    model = make_classifier()

    with pytest.raises(ValueError, match="dataloader yielded no batches"):
        compare(model, model, [])


def test_compare_input_only_batches_use_no_metric() -> None:
    model = make_classifier()
    inputs, _ = make_data()

    report = compare(model, model, make_loader(inputs))

    assert report.float_metrics == {}
    assert report.top1_agreement == 1.0


def test_compare_mapping_batches_match_tuple_batches() -> None:
    model = make_classifier()
    noisy = perturbed_copy(model, 0.3)
    inputs, targets = make_data()
    mapping_batches = [
        {"input": inputs[start : start + BATCH_SIZE], "target": targets[start : start + BATCH_SIZE]}
        for start in range(0, NUM_SAMPLES, BATCH_SIZE)
    ]

    from_mapping = compare(model, noisy, mapping_batches)
    from_tuples = compare(model, noisy, make_loader(inputs, targets))

    assert from_mapping.summary() == from_tuples.summary()


def test_compare_regression_output_has_no_agreement() -> None:
    torch.manual_seed(0)
    model = nn.Linear(NUM_FEATURES, 1)
    inputs, _ = make_data()
    targets = torch.randn(NUM_SAMPLES, 1)

    report = compare(model, perturbed_copy(model, 0.1), make_loader(inputs, targets))

    assert report.top1_agreement is None
    assert report.float_metrics == {}
    assert "output/top1_agreement" not in report.summary()


def test_compare_regression_metric() -> None:
    torch.manual_seed(0)
    model = nn.Linear(NUM_FEATURES, 1)
    inputs, _ = make_data()
    targets = torch.randn(NUM_SAMPLES, 1)

    report = compare(model, model, make_loader(inputs, targets), MeanSquaredError())

    with torch.no_grad():
        expected = (model(inputs) - targets).square().mean().item()
    assert report.float_metrics["mean_squared_error"] == pytest.approx(expected, rel=1e-5)


def test_compare_max_batches_limits_run() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    report = compare(model, model, make_loader(inputs, targets), max_batches=2)

    assert report.num_batches == 2
    assert report.num_samples == 2 * BATCH_SIZE


@pytest.mark.parametrize("max_batches", [0, -1, 1.5], ids=["zero", "negative", "float"])
def test_compare_rejects_bad_max_batches(max_batches: object) -> None:
    model = make_classifier()

    with pytest.raises(ValueError, match="max_batches"):
        compare(model, model, [torch.randn(2, NUM_FEATURES)], max_batches=max_batches)


def test_compare_restores_training_flags() -> None:
    model = make_classifier()
    model.train()
    model[0].eval()
    quantized = copy.deepcopy(model)
    quantized.eval()
    inputs, targets = make_data()

    compare(model, quantized, make_loader(inputs, targets))

    assert model.training
    assert not model[0].training
    assert model[2].training
    assert not quantized.training


class FailingModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training
        raise RuntimeError("forward failed")


def test_compare_restores_flags_after_error() -> None:
    model = make_classifier()
    failing = FailingModel().train()

    with pytest.raises(RuntimeError, match="forward failed"):
        compare(model, failing, [torch.randn(2, NUM_FEATURES)])

    assert failing.training


class TupleOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.inner(x), {"features": x}


def test_compare_tuple_output_uses_first_tensor() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    report = compare(TupleOutput(model), TupleOutput(model), make_loader(inputs, targets))

    assert report.float_metrics["accuracy"] == pytest.approx(
        hand_accuracy(model, inputs, targets), abs=FIGURE_TOLERANCE
    )
    assert report.top1_agreement == 1.0


class HalfOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).half()


def test_compare_half_output_error_within_rounding() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    report = compare(model, HalfOutput(model), make_loader(inputs, targets))

    with torch.no_grad():
        largest = model(inputs).abs().max().item()
    # float16 rounds to nearest with 10 stored mantissa bits, so the relative error is <= 2**-11.
    assert report.max_abs_error <= largest * 2**-11
    assert math.isfinite(report.output_sqnr_db)


class NanOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.inner(x).clone()
        output[0, 0] = float("nan")
        return output


def test_compare_nan_output_flags_report() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        report = compare(model, NanOutput(model), make_loader(inputs, targets))

    assert math.isnan(report.output_sqnr_db)
    assert report.output_has_nan
    assert math.isnan(report.max_abs_error)
    assert "NaN" in str(report)


def test_compare_finite_outputs_do_not_warn() -> None:
    model = make_classifier()
    inputs, targets = make_data()

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compare(model, model, make_loader(inputs, targets))


def test_compare_reports_model_sizes() -> None:
    model = make_classifier()
    smaller = copy.deepcopy(model).to(torch.bfloat16)
    inputs, targets = make_data()

    class CastInput(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(torch.bfloat16))

    report = compare(model, CastInput(smaller), make_loader(inputs, targets))

    assert report.float_size_bytes == model_size_bytes(model)
    assert report.quantized_size_bytes == model_size_bytes(smaller)
    assert report.summary()["size/ratio"] == pytest.approx(0.5)


# ComparisonReport


def make_report(**overrides: object) -> ComparisonReport:
    fields = {
        "float_metrics": {"accuracy": 0.9},
        "quantized_metrics": {"accuracy": 0.85},
        "float_size_bytes": 4 * 1024 * 1024,
        "quantized_size_bytes": 1024 * 1024,
        "output_sqnr_db": 30.0,
        "max_abs_error": 0.05,
        "top1_agreement": 0.97,
        "num_samples": 100,
        "num_batches": 4,
    }
    fields.update(overrides)
    return ComparisonReport(**fields)


def test_report_summary_keys() -> None:
    summary = make_report().summary()

    assert summary["delta/accuracy"] == pytest.approx(0.85 - 0.9)
    assert summary["size/ratio"] == pytest.approx(0.25)
    assert summary["output/top1_agreement"] == 0.97
    assert summary["num_samples"] == 100


def test_report_table_columns() -> None:
    table = make_report().table()

    assert [column.header for column in table.columns] == ["figure", "float", "quantized", "change"]


def test_report_str_shows_figures() -> None:
    text = str(make_report())

    assert "accuracy" in text
    assert "0.9000" in text
    assert "-0.0500" in text
    assert "4.00 MiB" in text
    assert "1.00 MiB" in text
    assert "top-1 agreement" in text
    assert "\x1b[" not in text
