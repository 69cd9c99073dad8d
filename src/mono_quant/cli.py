"""The ``mono-quant`` command."""

from __future__ import annotations

import sys

from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from mono_quant.config import PRESETS, QuantConfig
from mono_quant.io import read_artifact
from mono_quant.transform.report import LayerReport, QuantizationReport


def presets() -> None:
    """List the preset names accepted by mono_quant.quantize and what each one sets."""
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
    Console().print(table)


def inspect(path: str) -> None:
    """Print the header and the per-layer table of a file written by mono_quant.

    Args:
        path: file written by mono_quant.save or by QuantizeCallback.
    """
    artifact = read_artifact(path)
    console = Console()
    console.print(
        f"{path}: format_version {artifact['format_version']}, written by mono_quant "
        f"{artifact['mono_quant_version']} with torch {artifact['torch_version']}"
    )
    report = QuantizationReport(
        config=artifact["config"], layers=[LayerReport(**row) for row in artifact["layers"]]
    )
    console.print(report.table())


def main(argv: list[str] | None = None) -> None:
    """Run the ``mono-quant`` command; user mistakes exit with status 2 and a one-line error."""
    try:
        CLI([presets, inspect], args=argv, as_positional=True)
    except (ValueError, FileNotFoundError) as error:
        Console(stderr=True, soft_wrap=True).print(
            f"mono-quant: error: {error}", markup=False, highlight=False
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
