"""Run the ``mono-quant`` command as ``python -m mono_quant.cli``."""

from mono_quant.cli import main

main()
