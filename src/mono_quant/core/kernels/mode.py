"""Switch between the fast kernels and the reference (dequantize + ``F.linear``) path.

Fast kernels round differently from the reference, for example by running a matmul in
bfloat16. :func:`reference_kernels` and the environment variable ``MONO_QUANT_KERNELS=reference``
force the reference path, which reproduces ``forward_reference`` bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch

KERNELS_ENV = "MONO_QUANT_KERNELS"
KERNEL_MODES = ("auto", "reference")

# Depth of nested reference_kernels() blocks in the current thread or task.
_reference_depth: contextvars.ContextVar[int] = contextvars.ContextVar(
    "mono_quant_reference_depth", default=0
)
_warned_values: set[str] = set()


# On POSIX, CPython's os.environ keeps the raw bytes in ``_data``. Reading that dict directly
# skips the key encoding and value decoding of os.environ.get, which every quantized layer call
# pays: about 1 us warm, and tens of us right after a large matmul has evicted the CPU caches.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = KERNELS_ENV.encode() if os.name == "posix" and isinstance(_ENVIRON_DATA, dict) else None
_mode_by_raw: dict[object, str] = {}


def _env_mode() -> str:
    if _ENV_KEY is None:
        return _parse_mode(os.environ.get(KERNELS_ENV))
    raw = _ENVIRON_DATA.get(_ENV_KEY)  # type: ignore[union-attr]
    mode = _mode_by_raw.get(raw)
    if mode is None:
        mode = _mode_by_raw[raw] = _parse_mode(os.environ.get(KERNELS_ENV))
    return mode


def _parse_mode(value: str | None) -> str:
    if not value:
        return "auto"
    value = value.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value == "reference":
        return "reference"
    if value not in _warned_values:
        _warned_values.add(value)
        warnings.warn(
            f"{KERNELS_ENV}={value!r} is not one of {KERNEL_MODES}; using 'auto'. Set it to "
            "'reference' to force the reference path.",
            stacklevel=4,
        )
    return "auto"


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run quantized layers on their reference path inside the ``with`` block.

    The reference path dequantizes the weight and calls ``F.linear``, so outputs are
    reproducible across machines and equal ``forward_reference`` bit for bit. The setting
    applies to the current thread (and asyncio task) and nests.
    """
    token = _reference_depth.set(_reference_depth.get() + 1)
    try:
        yield
    finally:
        _reference_depth.reset(token)


def fast_kernels_enabled() -> bool:
    """Return True unless :func:`reference_kernels`, the environment or tracing forbids them.

    ``torch.compile`` and ``torch.export`` trace the reference path, because the fast paths
    keep Python state (prepacked weights, workspaces) that a graph cannot capture.
    """
    # Checked first, so that tracing never reaches the context variable or the environment.
    if torch.compiler.is_compiling():
        return False
    if _reference_depth.get() > 0:
        return False
    return _env_mode() == "auto"
