"""The ``mono-quant`` subcommands that run without LightningCLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser, Namespace
from rich.console import Console
from rich.table import Table
from torch import nn

from mono_quant.cli.progress import track
from mono_quant.cli.sources import (
    batch_dynamic_shapes,
    check_output_path,
    check_weight_source,
    example_batch,
    load_float_weights,
    merge_checkpoint_arguments,
    prepare_data,
    read_float_state_dict,
)
from mono_quant.config import PRESETS, QuantConfig
from mono_quant.evaluate import compare, quantize_with_budget
from mono_quant.evaluate.report import format_bytes
from mono_quant.io import export, load, read_artifact, save
from mono_quant.io.load import config_from_header, layer_reports_from_header
from mono_quant.lightning.checkpoint import read_checkpoint
from mono_quant.transform import quantization_report, quantize

PIPED_WIDTH = 120


class Context:
    """Consoles of one command run: results go to stdout, progress bars to stderr."""

    def __init__(self) -> None:
        self.out = Console()
        if not self.out.is_terminal and "COLUMNS" not in os.environ:
            # Piped output gets rich's default of 80 columns, which folds the layer table.
            self.out = Console(width=PIPED_WIDTH)
        self.progress = Console(stderr=True)


def _build(
    parser: ArgumentParser, config: Namespace, explicit: Namespace, weights_required: bool
) -> tuple[Namespace, nn.Module]:
    """Instantiate the command's classes and load the float weights; return both, in eval mode.

    A Lightning checkpoint is read first, so its hyper-parameters can fill the model's
    init_args before the model is built.
    """
    check_weight_source(config.ckpt_path, config.state_dict, weights_required)
    checkpoint = read_checkpoint(config.ckpt_path) if config.ckpt_path else None
    if checkpoint is not None:
        explicit_init_args = explicit.get("model.init_args")
        names = set(explicit_init_args.keys()) if explicit_init_args else set()
        merge_checkpoint_arguments(config.model, names, checkpoint)
    objects = parser.instantiate(config)
    model = objects.model

    if checkpoint is not None:
        load_float_weights(model, checkpoint["state_dict"], f"checkpoint {config.ckpt_path}")
    elif config.state_dict is not None:
        state = read_float_state_dict(config.state_dict)
        load_float_weights(model, state, f"state_dict file {config.state_dict}")
    model.eval()
    return objects, model


def _quant_config(config: Namespace) -> QuantConfig:
    return QuantConfig(
        bits=config.bits,
        activations=config.activations,
        granularity=config.granularity,
        group_size=config.group_size,
        symmetric=config.symmetric,
        observer=config.observer,
        weight_observer=config.weight_observer,
        dtype=config.dtype,
        include=tuple(config.include) if config.include is not None else None,
        exclude=tuple(config.exclude) if config.exclude is not None else None,
    )


def _plain_model_record(config: Namespace) -> dict[str, Any]:
    """Return the model's class path and init_args as plain values, for the file's metadata."""
    record = config.model.as_dict() if hasattr(config.model, "as_dict") else dict(config.model)
    return {"class_path": str(record.get("class_path")), "init_args": record.get("init_args")}


def _export(
    model: nn.Module, loader: Any, path: str, dynamic_batch: bool, context: Context
) -> None:
    args = example_batch(loader)
    dynamic_shapes = batch_dynamic_shapes(args) if dynamic_batch else None
    output = export(model, args, check_output_path(path, "--export/--output"), dynamic_shapes)
    shapes = [list(arg.shape) for arg in args if hasattr(arg, "shape")]
    batch = "any batch size" if dynamic_batch else "the example batch size only"
    context.out.print(f"wrote the torch.export program {output} (example inputs {shapes}, {batch})")


def run_quantize(
    parser: ArgumentParser, config: Namespace, explicit: Namespace, context: Context
) -> None:
    """Quantize a float checkpoint or state_dict, compare, print and write the file."""
    quant_config = _quant_config(config)
    output = check_output_path(config.output, "--output")
    if config.seed is not None:
        pl.seed_everything(config.seed, verbose=False)
    objects, model = _build(parser, config, explicit, weights_required=True)
    train_loader, eval_loader = prepare_data(objects.data, config.eval_split)

    calibration = None
    if quant_config.calibrates_any_layer:
        if train_loader is None:
            raise ValueError(
                f"{type(objects.data).__name__} has no train_dataloader, which static "
                "activations need for calibration; use --activations dynamic or null."
            )
        calibration = track(
            train_loader, "calibrating", config.calibration_batches, context.progress
        )
    budget = None
    if config.max_metric_drop is not None:
        # The search calibrates and evaluates many times, so it gets the loaders themselves;
        # a progress bar would restart at every candidate.
        quantized, budget = quantize_with_budget(
            model,
            quant_config,
            train_loader if quant_config.calibrates_any_layer else None,
            eval_loader,
            float(config.max_metric_drop),
            metrics=objects.metrics,
            monitor=config.monitor,
            max_batches=config.eval_batches,
            calibration_batches=config.calibration_batches,
        )
    else:
        if config.monitor is not None:
            raise ValueError(
                f"--monitor {config.monitor} only applies to a metric budget; add "
                "--max_metric_drop, or drop --monitor."
            )
        quantized = quantize(model, quant_config, calibration_data=calibration)

    evaluation = track(eval_loader, "evaluating", config.eval_batches, context.progress)
    report = compare(model, quantized, evaluation, metrics=objects.metrics)
    report.title = f"float vs {quant_config.label}"
    context.out.print(report.table())
    context.out.print(quantization_report(quantized).table())
    if budget is not None:
        context.out.print(budget.table())

    metadata = {
        "model": _plain_model_record(config),
        "source": config.ckpt_path or config.state_dict,
        "comparison": {
            key: value for key, value in report.summary().items() if isinstance(value, (int, float))
        },
    }
    try:
        path = save(quantized, output, metadata=metadata)
    except TypeError:
        # init_args that are not plain values are left out rather than failing the run.
        metadata["model"] = {"class_path": metadata["model"]["class_path"]}
        path = save(quantized, output, metadata=metadata)
    context.out.print(f"wrote the mono-quant file {path}")
    if config.export is not None:
        _export(quantized, eval_loader, config.export, config.dynamic_batch, context)


def run_compare(
    parser: ArgumentParser, config: Namespace, explicit: Namespace, context: Context
) -> None:
    """Compare a float model with a mono-quant file of it and print the table."""
    objects, model = _build(parser, config, explicit, weights_required=True)
    quantized = load(config.artifact, model)
    _, eval_loader = prepare_data(objects.data, config.eval_split)
    evaluation = track(eval_loader, "evaluating", config.eval_batches, context.progress)
    report = compare(model, quantized, evaluation, metrics=objects.metrics)
    report.title = f"float vs {Path(config.artifact).name}"
    context.out.print(report.table())


def run_export(
    parser: ArgumentParser, config: Namespace, explicit: Namespace, context: Context
) -> None:
    """Rebuild a mono-quant file on the float skeleton and write its torch.export program."""
    check_output_path(config.output, "--output")
    objects, skeleton = _build(parser, config, explicit, weights_required=False)
    quantized = load(config.artifact, skeleton, inplace=True)
    _, eval_loader = prepare_data(objects.data, config.eval_split)
    _export(quantized, eval_loader, config.output, config.dynamic_batch, context)


def _saved_layout(artifact: Mapping[str, Any], name: str) -> Any:
    """Return the extra state saved for a layer or for a parameter stored through a
    parametrization (at ``<owner>.parametrizations.<name>.0``), or ``None``."""
    state = artifact["state_dict"]
    prefix = f"{name}." if name else ""
    owner, _, attribute = name.rpartition(".")
    owner_prefix = f"{owner}." if owner else ""
    parametrization = f"{owner_prefix}parametrizations.{attribute}.0."
    return state.get(prefix + "_extra_state", state.get(parametrization + "_extra_state"))


def _layout_cells(
    row: Any, artifact: Mapping[str, Any], config: QuantConfig
) -> tuple[str, str, str, str]:
    """Return the quantized-as, bits, granularity and activations cells of one layer."""
    if not row.quantized:
        return "float", "-", "-", "-"
    quantized_type = str(artifact.get("quantized_types", {}).get(row.name, "?"))
    quantized_type = quantized_type.rsplit(".", 1)[-1]
    if not config.is_integer:
        return quantized_type, f"16 ({config.dtype})", "-", "-"
    layout = _saved_layout(artifact, row.name)
    if not isinstance(layout, Mapping):
        return quantized_type, str(config.bits), config.granularity, str(config.activations)
    granularity = str(layout.get("granularity"))
    if layout.get("group_size"):
        granularity += f" {layout['group_size']}"
    activations = layout.get("activations") or "float"
    return quantized_type, str(layout.get("bits")), granularity, str(activations)


def artifact_table(artifact: Mapping[str, Any]) -> Table:
    """Return a rich table with one row per layer of a mono-quant file."""
    config = config_from_header(artifact)
    table = Table(title="layers")
    columns = ("layer", "type", "quantized as", "bits", "granularity", "activations")
    for column in (*columns, "weight bytes"):
        table.add_column(column, no_wrap=True)
    table.add_column("note")
    for row in layer_reports_from_header(artifact):
        cells = _layout_cells(row, artifact, config)
        if row.quantized:
            size = f"{format_bytes(row.float_bytes)} -> {format_bytes(row.quantized_bytes)}"
            note = row.reason
        else:
            size = format_bytes(row.float_bytes)
            note = f"skipped: {row.reason}"
        table.add_row(row.name or "(root)", row.type_name, *cells, size, note)
    return table


def run_inspect(config: Namespace, context: Context) -> None:
    """Print the header and the per-layer table of a mono-quant file."""
    artifact = read_artifact(config.path)
    quant_config = config_from_header(artifact)
    layers = layer_reports_from_header(artifact)
    quantized = sum(row.quantized for row in layers)
    context.out.print(
        f"{config.path}: mono-quant format_version {artifact['format_version']}, written by "
        f"mono_quant {artifact.get('mono_quant_version')} with torch "
        f"{artifact.get('torch_version')}"
    )
    context.out.print(
        f"config: {quant_config.label}; {quantized} of {len(layers)} layers quantized"
    )
    metadata = artifact.get("metadata") or {}
    model = metadata.get("model") if isinstance(metadata, Mapping) else None
    if isinstance(model, Mapping) and model.get("class_path"):
        context.out.print(f"model: {model['class_path']} {model.get('init_args') or ''}")
    context.out.print(artifact_table(artifact))


def run_presets(context: Context) -> None:
    """Print the preset table."""
    table = Table(title="presets")
    for column in ("preset", "weights", "activations", "granularity"):
        table.add_column(column)
    for name in PRESETS:
        config = QuantConfig.from_preset(name)
        weights = f"int{config.bits}" if config.is_integer else config.dtype
        group = f" (group_size {config.group_size})" if config.group_size else ""
        activations = f"int8 {config.activations}" if config.activations else "float"
        granularity = f"{config.granularity}{group}" if config.is_integer else "-"
        table.add_row(name, weights, activations, granularity)
    context.out.print(table)
