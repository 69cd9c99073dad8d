"""The ``mono-quant`` command.

Subcommands: ``quantize``, ``compare``, ``inspect``, ``export`` and ``presets`` run here;
``fit``, ``validate``, ``test`` and ``predict`` run a LightningCLI whose ``--model`` and
``--data`` take class paths. User mistakes end with exit status 2 and one line on stderr
that starts with ``mono-quant: error:``. Set the environment variable
``MONO_QUANT_TRACEBACK=1`` to get the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.console import Console

from mono_quant.cli.commands import (
    Context,
    run_compare,
    run_export,
    run_inspect,
    run_presets,
    run_quantize,
)
from mono_quant.cli.lightning_cli import (
    LIGHTNING_SUBCOMMANDS,
    ConfigError,
    QuantizeLightningCLI,
    lightning_cli,
)
from mono_quant.cli.parser import build_parser

USAGE_ERROR = 2
TRACEBACK_VARIABLE = "MONO_QUANT_TRACEBACK"

# Errors that a wrong file, option value, model or data module produce. Calibration and
# comparison re-raise a failing forward pass as RuntimeError with the batch named.
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ConfigError)

__all__ = ["LIGHTNING_SUBCOMMANDS", "QuantizeLightningCLI", "lightning_cli", "main"]


def _fail(error: BaseException) -> None:
    message = " ".join(str(error).split())
    Console(stderr=True, soft_wrap=True).print(
        f"mono-quant: error: {message}", markup=False, highlight=False
    )
    sys.exit(USAGE_ERROR)


def _add_working_directory_to_path() -> None:
    # Class paths such as examples.digits.model.DigitsCNN resolve from the directory the
    # command runs in, as they do under `python -m`. It goes last, so installed packages win.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``mono-quant`` command with ``argv`` (default ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _add_working_directory_to_path()

    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        try:
            # argv=None lets LightningCLI read sys.argv itself, as it expects to.
            lightning_cli(None if argv is None else args)
        except ConfigError as error:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            _fail(error)
        return

    parser, subparsers = build_parser()
    config = parser.parse_args(args)
    explicit = parser.parse_args(args, defaults=False)
    name = config.subcommand
    context = Context()
    try:
        if name == "presets":
            run_presets(context)
        elif name == "inspect":
            run_inspect(config[name], context)
        else:
            run = {"quantize": run_quantize, "compare": run_compare, "export": run_export}[name]
            run(subparsers[name], config[name], explicit[name], context)
    except _USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        _fail(error)
