"""``mono-quant fit|validate|test``: a LightningCLI whose callbacks include QuantizeCallback."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class ConfigError(Exception):
    """A value in the command line or a config file that a class rejected while being built."""


def innermost_message(error: BaseException) -> str:
    """Return the message of the deepest exception in ``error``'s chain, on one line.

    jsonargparse wraps a constructor's ``ValueError`` in a long "Does not validate against any
    of the Union subtypes" report; the constructor's own message is the useful part.
    """
    seen = {id(error)}
    while True:
        following = error.__cause__ or error.__context__
        if following is None or id(following) in seen:
            break
        seen.add(id(following))
        error = following
    return " ".join(str(error).split())


class QuantizeLightningCLI(LightningCLI):
    """LightningCLI whose ``--model`` and ``--data`` take any class path.

    Values that a class rejects while being built (for example ``bits: 4`` with
    ``dtype: float16`` for ``QuantizeCallback``) are raised as :class:`ConfigError`, so the
    ``mono-quant`` command reports them in one line instead of a traceback.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            raise ConfigError(innermost_message(error)) from error


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build the LightningCLI; with ``run`` it also runs the subcommand in ``args``.

    ``--model`` and ``--data`` take class paths such as ``examples.digits.model.DigitsCNN``,
    resolved from installed packages and the current directory. ``args=None`` reads
    ``sys.argv``.
    """
    return QuantizeLightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
    )
