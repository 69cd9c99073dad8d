"""Read mono-quant files without executing pickled code."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mono_quant.io.save import ARTIFACT_FORMAT, ARTIFACT_VERSION

# torch names the rejected class or function as "GLOBAL module.name" in its error message.
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_weights_only(path: str | os.PathLike[str], kind: str = "mono-quant file") -> Any:
    """Return the object stored at ``path``, read with ``torch.load(weights_only=True)``.

    The weights-only unpickler rebuilds only tensors and plain Python values, so code stored in
    the file never runs. There is no fallback to a full unpickle. ``kind`` names the expected
    file in error messages, for example ``"Lightning checkpoint"``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when ``path`` is a directory, is truncated or not a torch file, or contains
            pickled Python objects other than tensors and plain values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {kind} at {path}: the path does not exist.")
    if not path.is_file():
        raise ValueError(f"{path} is a directory, not a {kind}; pass the file inside it.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        rejected = _REJECTED_GLOBAL.search(str(error))
        if rejected is None:
            raise ValueError(
                f"{path} is not a readable {kind} (UnpicklingError); it is truncated or was "
                "not written by torch.save."
            ) from None
        # torch's own message suggests weights_only=False, which would run the pickled code,
        # so it is not passed on.
        raise ValueError(
            f"{path} contains a pickled Python object ({rejected.group(1)}) that a weights-only "
            f"load rejects, so it is not a safe {kind}. mono_quant never runs code stored in a "
            "file; save only tensors and plain values (state_dict) from trusted code."
        ) from None
    except Exception as error:
        # The weights-only unpickler raises many types on foreign bytes (KeyError, IndexError,
        # RuntimeError for a broken zip), so any failure here means "not a torch file".
        raise ValueError(
            f"{path} is not a readable {kind} ({type(error).__name__}); it is truncated or was "
            "not written by torch.save."
        ) from None


def read_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the contents of a file written by :func:`mono_quant.save`.

    The file is read with ``torch.load(weights_only=True)``, which rebuilds only tensors and
    plain Python values and never runs code stored in the file.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is truncated, is not a mono-quant file, or was written by a
            newer format version.
    """
    payload = load_weights_only(path)
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"{path} is not a mono-quant file: it has no '{ARTIFACT_FORMAT}' header. A plain "
            "state_dict or Lightning checkpoint must be quantized first (mono_quant.quantize "
            "or mono-quant quantize)."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}, newer than this mono_quant reads "
            f"({ARTIFACT_VERSION}); upgrade mono_quant."
        )
    missing = [key for key in ("config", "layers", "state_dict") if key not in payload]
    if missing:
        raise ValueError(
            f"{path} has a mono-quant header but no {missing}; the file is damaged. Save the "
            "model again with mono_quant.save."
        )
    return payload
