"""Write quantized models to files that load without executing pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.transform.state import quantization_report

ARTIFACT_FORMAT = "mono-quant"
ARTIFACT_VERSION = 1


def save(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> Path:
    """Save a quantized model's ``state_dict`` with a header describing how it was quantized.

    The file contains only tensors and plain Python values, so ``torch.load(path,
    weights_only=True)`` reads it. The header contains the format name and version, the package
    version, the config and the per-layer report. ``metadata`` adds plain values of your own.

    Raises:
        ValueError: when ``model`` was not produced by ``mono_quant.quantize``/``convert``.
    """
    from mono_quant import __version__

    report = quantization_report(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "mono_quant_version": str(__version__),
        "torch_version": str(torch.__version__),
        "config": report.config,
        "layers": report.to_dict()["layers"],
        "metadata": metadata or {},
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)
    return path
