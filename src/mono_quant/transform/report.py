"""Per-layer record of what quantization did to a model."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class LayerReport:
    """Outcome for one layer: quantized with a format, or kept in float with a reason."""

    name: str
    type_name: str
    quantized: bool
    format: str = "float32"
    reason: str = ""
    float_bytes: int = 0
    quantized_bytes: int = 0


@dataclass
class QuantizationReport:
    """Layer-by-layer outcome of ``convert``, with the config that produced it."""

    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def quantized_layers(self) -> list[LayerReport]:
        """Layers that were converted."""
        return [layer for layer in self.layers if layer.quantized]

    @property
    def float_layers(self) -> list[LayerReport]:
        """Layers that own parameters but stayed in float, each with its reason."""
        return [layer for layer in self.layers if not layer.quantized]

    def summary(self) -> dict[str, Any]:
        """Return counts, weight bytes of the quantized layers, and every float layer's reason."""
        float_bytes = sum(layer.float_bytes for layer in self.quantized_layers)
        quantized_bytes = sum(layer.quantized_bytes for layer in self.quantized_layers)
        return {
            "layers_quantized": len(self.quantized_layers),
            "layers_float": len(self.float_layers),
            "quantized_layers_float_bytes": float_bytes,
            "quantized_layers_bytes": quantized_bytes,
            "quantized_layers_ratio": quantized_bytes / float_bytes if float_bytes else None,
            "float_layers": {layer.name: layer.reason for layer in self.float_layers},
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the whole report as plain Python values."""
        return {"config": self.config, "layers": [asdict(layer) for layer in self.layers]}

    def table(self) -> Table:
        """Return a rich table with one row per layer."""
        table = Table(title="layers")
        for column in ("layer", "type", "format", "weight bytes", "note"):
            table.add_column(column)
        for layer in self.layers:
            size = f"{layer.float_bytes} -> {layer.quantized_bytes}" if layer.quantized else "-"
            table.add_row(layer.name or "(root)", layer.type_name, layer.format, size, layer.reason)
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=120, color_system=None).print(self.table())
        return buffer.getvalue()
