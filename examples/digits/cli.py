"""Run the digits example from a LightningCLI config file.

From the repository root, either of::

    mono-quant fit --config configs/digits-w8a8.yaml
    python -m examples.digits.cli fit --config configs/digits-w8a8.yaml

Every file in ``configs/`` sets the trainer, the model and data class paths and a
``QuantizeCallback``. This module runs the same LightningCLI as ``mono-quant fit``.
"""

from lightning.pytorch.cli import LightningCLI

from mono_quant.cli import lightning_cli


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI; with ``run`` True it also runs the subcommand in ``args``."""
    return lightning_cli(args, run=run)


if __name__ == "__main__":
    main()
