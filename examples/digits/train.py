"""Train DigitsCNN on the 8x8 digits and quantize it to int8 and to int4 with QuantizeCallback.

Run from the repository root::

    python -m examples.digits.train            # 10 epochs, about 10 s in all on 2 CPU cores
    python -m examples.digits.train --fast     # 1 epoch, for smoke runs

Each callback prints its float-versus-quantized table when fit ends and saves its quantized
model under ``<output-dir>/<preset>``. This script then prints one summary line per preset.
"""

import argparse
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console

from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN
from mono_quant.lightning import QuantizeCallback

# Preset name -> QuantizeCallback arguments. The int4 preset uses per_group scales with
# group_size 32, which divides the input width of both linear layers (512 and 128). The conv
# layers have 9 and 144 inputs per output channel, so their last group is shorter than 32.
PRESETS: dict[str, dict[str, int]] = {
    "int8": {"bits": 8},
    "int4-g32": {"bits": 4, "group_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command-line options of the demo."""
    parser = argparse.ArgumentParser(
        description="Train a small CNN on scikit-learn's 8x8 digits and quantize it.",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="number of training epochs (default: 10)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the data split, weight initialization and shuffling (default: 0)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs/digits"),
        help="directory for CSV logs, checkpoints and quantized models (default: runs/digits)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="train for 1 epoch only, for smoke runs"
    )
    args = parser.parse_args(argv)
    if args.epochs <= 0:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    return args


def format_metric(value: object, digits: int = 4) -> str:
    """Format a report value with ``digits`` decimals, or return ``n/a`` when it is missing."""
    if isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return "n/a"


def main(argv: list[str] | None = None) -> None:
    """Train, quantize with every preset and print one summary line per preset."""
    args = parse_args(argv)
    epochs = 1 if args.fast else args.epochs
    output_dir: Path = args.output_dir

    L.seed_everything(args.seed, workers=True)

    callbacks = {
        name: QuantizeCallback(**kwargs, save_dir=str(output_dir / name))
        for name, kwargs in PRESETS.items()
    }
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks.values()),
        default_root_dir=output_dir,
        deterministic=True,
        accelerator="cpu",
        logger=CSVLogger(save_dir=output_dir, name="logs"),
        enable_model_summary=False,
    )
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule(seed=args.seed))

    console = Console()
    for name, callback in callbacks.items():
        summary = callback.report.summary()
        console.print(
            f"[bold]{name}[/bold]: "
            f"float acc {format_metric(summary.get('float/accuracy'))}, "
            f"quantized acc {format_metric(summary.get('quantized/accuracy'))}, "
            f"size quantized/float {format_metric(summary.get('size/ratio'), digits=3)}"
        )


if __name__ == "__main__":
    main()
