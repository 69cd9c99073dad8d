"""Compare a metric budget with "first and last layer in float" on the digits CNN.

Trains the digits CNN, then for each low bit width quantizes it three ways and prints one row
each: every layer at that width, the common rule of thumb that keeps the first and the last
layer in float, and ``mono_quant.quantize_with_budget`` with a budget on validation accuracy.

Run with ``python -m examples.digits.budget`` from the repository root.
"""

from __future__ import annotations

import argparse

import lightning as L
from rich.console import Console
from rich.table import Table
from torch import nn

import mono_quant as mq
from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line: epochs, budget, bit widths, seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--budget", type=float, default=0.01, help="max accuracy drop")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="bit widths to try")
    parser.add_argument("--seed", type=int, default=0, help="seed for data split and training")
    return parser.parse_args(argv)


def train(epochs: int, seed: int) -> tuple[nn.Module, DigitsDataModule]:
    """Train the digits CNN on CPU and return it in eval mode with its data module."""
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(seed=seed)
    model = DigitsCNN()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=data)
    return model.eval(), data


def _row(label: str, report: mq.ComparisonReport, wide: int) -> list[str]:
    drop = report.float_metrics["accuracy"] - report.quantized_metrics["accuracy"]
    return [
        label,
        f"{report.quantized_metrics['accuracy']:.4f}",
        f"{drop:+.4f}",
        str(wide),
        f"{report.quantized_size_bytes / report.float_size_bytes:.3f}",
    ]


def main(argv: list[str] | None = None) -> None:
    """Train, quantize each way at each bit width and print the table."""
    args = parse_args(argv)
    model, data = train(args.epochs, args.seed)
    calibration = data.train_dataloader()
    validation = data.val_dataloader()
    layers = [row.name for row in mq.quantization_report(mq.quantize(model, "w8", None)).layers]
    first_last = (layers[0], layers[-1])

    table = Table(title=f"digits CNN, budget: accuracy drop <= {args.budget}")
    for column in ("run", "accuracy", "drop", "wide layers", "size vs fp32"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for bits in args.bits:
        config = mq.QuantConfig(bits=bits, granularity="per_channel")
        everywhere = mq.quantize(model, config, calibration)
        report = mq.compare(model, everywhere, validation)
        table.add_row(*_row(f"int{bits} everywhere", report, 0))
        kept = mq.quantize(model, config.replace(exclude=first_last), calibration)
        report = mq.compare(model, kept, validation)
        table.add_row(*_row(f"int{bits}, first and last float", report, 2))
        budgeted, budget = mq.quantize_with_budget(
            model, config, calibration, validation, args.budget, monitor="accuracy"
        )
        moved = ", ".join(f"{m.name}->{m.to_format.split(',')[0]}" for m in budget.moved)
        report = mq.compare(model, budgeted, validation)
        table.add_row(*_row(f"int{bits} budget ({moved or 'none'})", report, len(budget.moved)))
    Console().print(table)


if __name__ == "__main__":
    main()
