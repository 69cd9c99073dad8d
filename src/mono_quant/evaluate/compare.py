"""Run a float model and its quantized copy on the same batches and compare their outputs."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mono_quant.evaluate.errors import OutputErrorStats, is_classification_output
from mono_quant.evaluate.report import ComparisonReport
from mono_quant.evaluate.size import model_size_bytes
from mono_quant.transform.batches import model_device, move_to_device, split_batch

DEFAULT_ACCURACY_NAME = "accuracy"


def compare(
    float_model: nn.Module,
    quantized_model: nn.Module,
    dataloader: Iterable[Any],
    metrics: Metric | MetricCollection | None = None,
    max_batches: int | None = None,
) -> ComparisonReport:
    """Run both models on the same batches and report task metrics, sizes and output errors.

    Each batch is split into ``(input, target)`` by ``split_batch``, and each model receives
    ``model(input)`` with the input moved to that model's device. Both models run in eval mode
    under ``torch.inference_mode()``. Every module's previous ``training`` flag is restored
    afterwards, even when a batch raises.

    ``metrics`` is cloned and reset once per model, so the object passed in is never updated.
    Each clone receives ``update(output, target)`` per batch and ``compute()`` at the end. The
    figures are named by the collection's keys, or for a single metric by its class name in
    snake case (``MulticlassAccuracy`` becomes ``multiclass_accuracy``). With ``metrics=None``
    and class-score outputs ``(N, C >= 2)`` with integer targets ``(N,)`` in the first batch,
    a micro-averaged ``MulticlassAccuracy`` named ``accuracy`` is used. Otherwise only the
    output error figures are reported.

    The output error figures compare the quantized output with the float output in at least
    float32 (float16 and bfloat16 outputs are cast up): SQNR in dB over all batches, the max
    absolute difference and, for ``(N, C >= 2)`` outputs, the top-1 agreement. A NaN in an
    output makes the SQNR ``nan`` and raises a ``RuntimeWarning`` instead of an error.

    NOTE: when a model returns a tuple, list or dict, only the first tensor found in it
    (depth first, in order) is used for the metrics and the error figures.

    NOTE: under torch.distributed, torchmetrics syncs the metric figures across ranks when they
    are computed, but the SQNR, max error and agreement cover this rank's batches only.

    Args:
        float_model: the reference model.
        quantized_model: the model to compare against the reference.
        dataloader: any iterable of batches, such as a ``torch.utils.data.DataLoader``.
        metrics: a torchmetrics ``Metric`` or ``MetricCollection``, or ``None``.
        max_batches: stop after this many batches; ``None`` runs the whole dataloader.

    Raises:
        TypeError: for a model that is not an ``nn.Module``, a ``metrics`` of another type or an
            output that contains no tensor.
        ValueError: for a non-positive ``max_batches``, an empty dataloader, a batch without a
            target while a task metric is in use, outputs of different shapes, or a metric that
            computes a non-scalar value.
    """
    _check_arguments(float_model, quantized_model, metrics, max_batches)

    float_flags = _training_flags(float_model)
    quantized_flags = _training_flags(quantized_model)
    try:
        float_model.eval()
        quantized_model.eval()
        with torch.inference_mode():
            run = _ComparisonRun(float_model, quantized_model, metrics)
            for batch_index, batch in enumerate(dataloader):
                if max_batches is not None and batch_index >= max_batches:
                    break
                run.update(batch, batch_index)
            float_metrics, quantized_metrics = run.compute_metrics()
    finally:
        _restore_training_flags(float_flags)
        _restore_training_flags(quantized_flags)

    stats = run.stats
    _warn_on_nonfinite(stats)
    return ComparisonReport(
        float_metrics=float_metrics,
        quantized_metrics=quantized_metrics,
        float_size_bytes=model_size_bytes(float_model),
        quantized_size_bytes=model_size_bytes(quantized_model),
        output_sqnr_db=stats.sqnr_db,
        max_abs_error=stats.max_abs_error,
        top1_agreement=stats.top1_agreement,
        num_samples=stats.num_samples,
        num_batches=stats.num_batches,
    )


class _ComparisonRun:
    """State of one ``compare`` call: metric clones per model and the running error figures."""

    def __init__(
        self,
        float_model: nn.Module,
        quantized_model: nn.Module,
        metrics: Metric | MetricCollection | None,
    ) -> None:
        self.float_model = float_model
        self.quantized_model = quantized_model
        self.float_device = model_device(float_model)
        self.quantized_device = model_device(quantized_model)
        self.requested_metrics = metrics
        self.metric_name = ""
        self.float_metric: Metric | MetricCollection | None = None
        self.quantized_metric: Metric | MetricCollection | None = None
        self.stats = OutputErrorStats()

    def update(self, batch: Any, batch_index: int) -> None:
        """Run both models on one batch and add its outputs to the metrics and error figures."""
        model_input, target = split_batch(batch)
        float_output = first_tensor(
            self.float_model(move_to_device(model_input, self.float_device)), "float_model"
        )
        quantized_output = first_tensor(
            self.quantized_model(move_to_device(model_input, self.quantized_device)),
            "quantized_model",
        )
        float_output = _upcast(float_output)
        quantized_output = _upcast(quantized_output)
        if float_output.shape != quantized_output.shape:
            raise ValueError(
                f"Batch {batch_index}: float_model returned shape {tuple(float_output.shape)} "
                f"but quantized_model returned {tuple(quantized_output.shape)}. Both models "
                "must return outputs of the same shape for the same input."
            )

        if batch_index == 0:
            self._set_up_metrics(float_output, quantized_output, target)
        if self.float_metric is not None and self.quantized_metric is not None:
            self._update_metrics(float_output, quantized_output, target, batch_index)

        self.stats.update(float_output, quantized_output)

    def compute_metrics(self) -> tuple[dict[str, float], dict[str, float]]:
        """Return the computed metrics of the float and the quantized model as floats."""
        if self.stats.num_batches == 0:
            raise ValueError(
                "Cannot compare the models because the dataloader yielded no batches. Pass a "
                "dataloader with at least one batch."
            )
        if self.float_metric is None or self.quantized_metric is None:
            return {}, {}
        float_metrics = metric_values(self.float_metric, self.metric_name)
        quantized_metrics = metric_values(self.quantized_metric, self.metric_name)
        return float_metrics, quantized_metrics

    def _set_up_metrics(self, float_output: Tensor, quantized_output: Tensor, target: Any) -> None:
        metric = self.requested_metrics
        if metric is None:
            metric = default_metric(float_output, target)
            self.metric_name = DEFAULT_ACCURACY_NAME
        else:
            self.metric_name = metric_name(metric)
        if metric is None:
            return

        self.float_metric = _fresh_clone(metric).to(float_output.device)
        self.quantized_metric = _fresh_clone(metric).to(quantized_output.device)

    def _update_metrics(
        self, float_output: Tensor, quantized_output: Tensor, target: Any, batch_index: int
    ) -> None:
        if target is None:
            raise ValueError(
                f"Batch {batch_index} has no target, but the metric '{self.metric_name}' needs "
                "one. Task metrics need (input, target) batches or a mapping with a target key. "
                "Pass such a dataloader, or compare with metrics=None on input-only batches "
                "to get only the output error figures."
            )
        for metric, output in (
            (self.float_metric, float_output),
            (self.quantized_metric, quantized_output),
        ):
            metric.update(output, move_to_device(target, output.device))


def first_tensor(output: Any, model_name: str) -> Tensor:
    """Return ``output`` if it is a tensor, else the first tensor in its nested containers.

    Raises:
        TypeError: when ``output`` contains no tensor.
    """
    found = _search_tensor(output)
    if found is None:
        raise TypeError(
            f"{model_name} returned {type(output).__name__} with no tensor in it. compare() "
            "needs a tensor output, or a tuple, list or dict whose first tensor is the output "
            "to compare."
        )
    return found


def _search_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        found = _search_tensor(value)
        if found is not None:
            return found
    return None


def default_metric(float_output: Tensor, target: Any) -> Metric | None:
    """Return a micro-averaged ``MulticlassAccuracy`` for class scores with integer targets.

    The output must be floating ``(N, C)`` with ``C >= 2`` and the target an integer tensor of
    shape ``(N,)``. Any other pair returns ``None``.
    """
    if not (float_output.is_floating_point() and is_classification_output(float_output)):
        return None
    if not isinstance(target, Tensor) or target.dtype == torch.bool:
        return None
    if target.is_floating_point() or target.is_complex():
        return None
    if target.shape != (float_output.shape[0],):
        return None
    return MulticlassAccuracy(num_classes=float_output.shape[1], average="micro")


def metric_name(metric: Metric | MetricCollection) -> str:
    """Return the class name of ``metric`` in snake case, e.g. ``multiclass_f1_score``."""
    class_name = type(metric).__name__
    # Split before an upper-case letter that follows a lower-case letter or digit, and before
    # the last capital of an acronym (AUROCCurve -> AUROC_Curve).
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", class_name).lower()


def metric_values(metric: Metric | MetricCollection, name: str) -> dict[str, float]:
    """Compute ``metric`` and return its results as Python floats keyed by figure name.

    A ``MetricCollection`` uses the keys its ``compute()`` returns. A single metric uses
    ``name``, or ``name/<key>`` for each key when it computes a dict.

    Raises:
        ValueError: when a result is not a scalar.
    """
    result = metric.compute()
    if isinstance(metric, MetricCollection):
        return {str(key): _to_float(value, str(key)) for key, value in result.items()}
    if isinstance(result, Mapping):
        return {f"{name}/{key}": _to_float(value, f"{name}/{key}") for key, value in result.items()}
    return {name: _to_float(result, name)}


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ValueError(
        f"The metric '{name}' computed a non-scalar value ({shape}). compare() reports one "
        'number per metric, so use a scalar metric, e.g. average="macro" or average="micro" '
        "in place of average=None."
    )


def _fresh_clone(metric: Metric | MetricCollection) -> Metric | MetricCollection:
    # Reset drops any state the caller's object gathered before compare() was called.
    clone = metric.clone()
    clone.reset()
    return clone


def _upcast(output: Tensor) -> Tensor:
    """Cast float16, bfloat16 and integer outputs to float32, leaving float32 and float64 as is."""
    if output.is_complex():
        raise TypeError(
            f"compare() received a complex output of dtype {output.dtype}. Return a real tensor, "
            "e.g. torch.view_as_real(output)."
        )
    return output.to(torch.promote_types(output.dtype, torch.float32))


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore_training_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    # Restoring per module keeps mixed states, e.g. a frozen BatchNorm left in eval mode.
    for module, training in flags:
        module.training = training


def _check_arguments(
    float_model: Any, quantized_model: Any, metrics: Any, max_batches: Any
) -> None:
    for argument, model in (("float_model", float_model), ("quantized_model", quantized_model)):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"compare() expects {argument} to be an nn.Module, but received "
                f"{type(model).__name__}."
            )
    if metrics is not None and not isinstance(metrics, (Metric, MetricCollection)):
        raise TypeError(
            "compare() expects metrics to be a torchmetrics Metric or MetricCollection, or None, "
            f"but received {type(metrics).__name__}. Wrap several metrics in a MetricCollection."
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(
            f"compare() expects max_batches to be a positive int or None, but received "
            f"{max_batches!r}. Pass None to run the whole dataloader."
        )


def _warn_on_nonfinite(stats: OutputErrorStats) -> None:
    if stats.nonfinite_test == 0 and stats.nonfinite_reference == 0:
        return
    warnings.warn(
        f"The outputs contain non-finite values: {stats.nonfinite_reference} in float_model's "
        f"and {stats.nonfinite_test} in quantized_model's. The output SQNR "
        f"({stats.sqnr_db}) and max abs error ({stats.max_abs_error}) reflect them. Check the "
        "quantized model's scales and zero_points for overflow or division by zero.",
        RuntimeWarning,
        stacklevel=3,
    )
