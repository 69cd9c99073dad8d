"""Argument parsers of the ``mono-quant`` subcommands (jsonargparse, LightningCLI conventions)."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from torch import nn
from torchmetrics import Metric, MetricCollection

from mono_quant.cli.lightning_cli import LIGHTNING_SUBCOMMANDS
from mono_quant.core.observers import OBSERVERS

ObserverName = Literal[tuple(sorted(OBSERVERS))]  # type: ignore[valid-type]

_MODEL_HELP = (
    "Float model class (an nn.Module or LightningModule), as a class path with init_args. With "
    "--ckpt_path, the hyper-parameters saved in the checkpoint fill the init_args that are not "
    "given here. Class paths resolve from installed packages and the current directory."
)
_DATA_HELP = (
    "LightningDataModule class path with init_args. Its train_dataloader calibrates; the "
    "--eval_split dataloader evaluates and gives example inputs."
)


def _new_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML file with values for these options."
    )
    return parser


def _add_model_source(parser: ArgumentParser, weights_required: bool) -> None:
    parser.add_subclass_arguments(nn.Module, "model", required=True, help=_MODEL_HELP)
    use = "the float weights" if weights_required else "used for its hyper-parameters only"
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help=f"Lightning checkpoint of the float model ({use}).",
    )
    parser.add_argument(
        "--state_dict",
        type=str | None,
        default=None,
        help=f"File written by torch.save(model.state_dict()) ({use}).",
    )


def _add_data(parser: ArgumentParser) -> None:
    parser.add_subclass_arguments(pl.LightningDataModule, "data", required=True, help=_DATA_HELP)
    parser.add_argument(
        "--eval_split",
        type=Literal["val", "test"],
        default="val",
        help="Dataloader used for the comparison and the example inputs.",
    )


def _add_evaluation(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--metrics",
        type=Metric | MetricCollection | None,
        default=None,
        help="torchmetrics metric applied to (output, target); default top-1 accuracy for "
        "class scores with integer targets.",
    )
    parser.add_argument(
        "--eval_batches",
        type=PositiveInt | None,
        default=None,
        help="Number of evaluation batches; null runs the whole dataloader.",
    )


def _add_export_options(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--dynamic_batch",
        type=bool,
        default=True,
        help="Let dimension 0 of every input vary in the exported program; false fixes it to "
        "the example batch size.",
    )


def _add_quantization_options(parser: ArgumentParser) -> None:
    """Add the options of QuantizeCallback that decide how the model is quantized."""
    group = parser.add_argument_group("quantization (same names as QuantizeCallback)")
    group.add_argument(
        "--bits",
        type=Literal[2, 3, 4, 5, 6, 7, 8, 16],
        default=8,
        help="Weight width: 8 means W8A8 with static activations, 2 to 7 weight-only "
        "per_group, 16 a float16 cast.",
    )

    group.add_argument(
        "--activations",
        type=Literal["auto", "static", "dynamic"] | None,
        default="auto",
        help="Activation quantization: static (calibrated int8), dynamic (int8 per token), "
        "null (weight-only) or auto (from bits).",
    )

    group.add_argument(
        "--granularity",
        type=Literal["auto", "per_tensor", "per_channel", "per_group"],
        default="auto",
        help="Weight granularity.",
    )
    group.add_argument(
        "--group_size",
        type=PositiveInt | None,
        default=None,
        help="Weights per group for per_group granularity (default 32).",
    )
    group.add_argument(
        "--symmetric", type=bool, default=True, help="Symmetric weights (zero_point 0)."
    )

    group.add_argument(
        "--observer",
        type=ObserverName,
        default="minmax",
        help="How static activation ranges are recorded during calibration.",
    )
    group.add_argument(
        "--weight_observer",
        type=ObserverName,
        default="minmax",
        help="How weight ranges are chosen.",
    )

    group.add_argument(
        "--dtype",
        type=Literal["auto", "int", "float16", "bfloat16"],
        default="auto",
        help="Weight storage: int, float16 or bfloat16 (16-bit casts need bits 16).",
    )

    group.add_argument(
        "--include",
        type=list[str] | None,
        default=None,
        help="Quantize only layers whose qualified name matches one of these globs or whose "
        "class name equals one of them.",
    )
    group.add_argument(
        "--exclude",
        type=list[str] | None,
        default=None,
        help="Keep in float the layers that match one of these globs or class names.",
    )

    group.add_argument(
        "--calibration_batches",
        type=PositiveInt,
        default=32,
        help="Number of training batches used for calibration.",
    )


def quantize_parser() -> ArgumentParser:
    """Return the parser of ``mono-quant quantize``."""
    parser = _new_parser(
        "Quantize a trained float model: load its checkpoint or state_dict, calibrate on the "
        "data module's training batches, compare float and quantized outputs with "
        "torchmetrics, print the tables and write a mono-quant file (and optionally a "
        "torch.export program)."
    )
    _add_model_source(parser, weights_required=True)
    _add_data(parser)
    _add_quantization_options(parser)
    _add_evaluation(parser)
    budget = parser.add_argument_group("metric budget (same names as QuantizeCallback)")
    budget.add_argument(
        "--max_metric_drop",
        type=NonNegativeFloat | None,
        default=None,
        help="Largest allowed drop of --monitor on the evaluation split, in the metric's units "
        "(0.01 is one accuracy point). The most sensitive layers then move to wider formats "
        "(int8, then float) until the drop fits.",
    )
    budget.add_argument(
        "--monitor",
        type=str | None,
        default=None,
        help="Metric the budget applies to: a metric name or a unique prefix such as 'acc' "
        "(default: the first metric).",
    )
    parser.add_argument(
        "--seed",
        type=int | None,
        default=0,
        help="Seed set with lightning.seed_everything before the data module is built; null "
        "leaves the random state alone.",
    )
    parser.add_argument(
        "--output", type=str, required=True, help="Path of the mono-quant file to write (.pt)."
    )
    parser.add_argument(
        "--export",
        type=str | None,
        default=None,
        help="Also write a torch.export program of the quantized model to this path (.pt2).",
    )
    _add_export_options(parser)
    return parser


def compare_parser() -> ArgumentParser:
    """Return the parser of ``mono-quant compare``."""
    parser = _new_parser(
        "Compare a float model with a mono-quant file of it on a dataloader: torchmetrics, "
        "sizes, output SQNR and top-1 agreement."
    )
    _add_model_source(parser, weights_required=True)
    parser.add_argument(
        "--artifact", type=str, required=True, help="mono-quant file written by quantize."
    )
    _add_data(parser)
    _add_evaluation(parser)
    return parser


def export_parser() -> ArgumentParser:
    """Return the parser of ``mono-quant export``."""
    parser = _new_parser(
        "Write a torch.export program of a mono-quant file. The program runs with "
        "torch.export.load(path).module() where mono_quant is not installed."
    )
    _add_model_source(parser, weights_required=False)
    parser.add_argument(
        "--artifact", type=str, required=True, help="mono-quant file written by quantize."
    )
    _add_data(parser)
    parser.add_argument(
        "--output", type=str, required=True, help="Path of the program to write (.pt2)."
    )
    _add_export_options(parser)
    return parser


def inspect_parser() -> ArgumentParser:
    """Return the parser of ``mono-quant inspect``."""
    parser = ArgumentParser(
        description="Print the header and the per-layer table of a mono-quant file: type, "
        "bits, granularity, size, and why each float layer was skipped."
    )
    parser.add_argument("path", type=str, help="mono-quant file written by mono_quant.save.")
    return parser


def presets_parser() -> ArgumentParser:
    """Return the parser of ``mono-quant presets``."""
    return ArgumentParser(
        description="List the preset names accepted by mono_quant.quantize and what each sets."
    )


def lightning_placeholder(subcommand: str) -> ArgumentParser:
    """Return a parser that only documents a LightningCLI subcommand in ``mono-quant --help``."""
    return ArgumentParser(
        description=f"Run LightningCLI {subcommand}; run 'mono-quant {subcommand} --help' for "
        "its options."
    )


SUBCOMMAND_PARSERS = {
    "quantize": quantize_parser,
    "compare": compare_parser,
    "inspect": inspect_parser,
    "export": export_parser,
    "presets": presets_parser,
}

SUBCOMMAND_HELP = {
    "quantize": "Quantize a float checkpoint or state_dict and write a mono-quant file.",
    "compare": "Compare a float model with a mono-quant file of it.",
    "inspect": "Print the per-layer table of a mono-quant file.",
    "export": "Write a torch.export program of a mono-quant file.",
    "presets": "List the quantization presets.",
    "fit": "Train with LightningCLI; QuantizeCallback is set in the config's trainer.callbacks.",
    "validate": "Validate with LightningCLI.",
    "test": "Test with LightningCLI.",
    "predict": "Predict with LightningCLI.",
}


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """Return the ``mono-quant`` parser and its subcommand parsers by name."""
    parser = ArgumentParser(
        prog="mono-quant",
        description="Quantize PyTorch models after training, inspect and export the results, "
        "or train with a LightningCLI config that quantizes at fit end.",
    )
    subcommands = parser.add_subcommands(dest="subcommand")
    parsers = {name: build() for name, build in SUBCOMMAND_PARSERS.items()}
    for name, subparser in parsers.items():
        subcommands.add_subcommand(name, subparser, help=SUBCOMMAND_HELP[name])
    for name in LIGHTNING_SUBCOMMANDS:
        subcommands.add_subcommand(name, lightning_placeholder(name), help=SUBCOMMAND_HELP[name])
    return parser, parsers
