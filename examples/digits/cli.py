"""Run the digits example from a LightningCLI config file.

From the repository root::

    python -m examples.digits.cli fit --config configs/digits-w8a8.yaml

Every file in ``configs/`` sets the trainer, the model, the data and a ``QuantizeCallback``.
"""

from lightning.pytorch.cli import LightningCLI

from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the digits LightningCLI; with ``run`` True it also runs the subcommand."""
    return LightningCLI(DigitsCNN, DigitsDataModule, seed_everything_default=0, args=args, run=run)


if __name__ == "__main__":
    main()
