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


def _env_mode() -> str:
    value = os.environ.get(KERNELS_ENV)
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
            stacklevel=3,
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
