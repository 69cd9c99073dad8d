"""Read mono-quant files without executing pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mono_quant.io.save import ARTIFACT_FORMAT, ARTIFACT_VERSION


def read_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the contents of a file written by :func:`mono_quant.io.save`.

    The file is read with ``torch.load(weights_only=True)``, which rebuilds only tensors and
    plain Python values and never runs code stored in the file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is truncated, is not a mono-quant file, or was written by a
            newer format version.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no mono-quant file at {path}: the path does not exist.")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a mono-quant file; pass the .pt file inside.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # The weights-only unpickler raises many types on foreign bytes (KeyError, IndexError,
        # UnpicklingError, RuntimeError for a broken zip), so any failure here means "not ours".
        # torch's own message suggests weights_only=False, which would run pickled code, so it
        # is not passed on.
        raise ValueError(
            f"{path} is not a readable mono-quant file ({type(error).__name__}); it is truncated "
            "or was not written by mono_quant.save."
        ) from None

    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"{path} is not a mono-quant file: it has no '{ARTIFACT_FORMAT}' header. A plain "
            "state_dict or Lightning checkpoint must be quantized first (mono_quant.quantize)."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}, newer than this mono_quant reads "
            f"({ARTIFACT_VERSION}); upgrade mono_quant."
        )
    return payload
