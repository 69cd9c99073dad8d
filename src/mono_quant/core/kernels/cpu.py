"""CPU instruction-set flags that decide which kernels are exact or fast on this machine."""

from __future__ import annotations

import functools
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """Return the instruction-set flags of the first CPU in ``/proc/cpuinfo``.

    Returns an empty set where the file is missing or unreadable (macOS, Windows), so every
    check built on it returns False and the callers fall back to another path.
    """
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_vnni() -> bool:
    """Return True when the CPU has VNNI, whose u8 x s8 dot products never saturate."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def has_native_float16() -> bool:
    """Return True when the CPU computes float16 arithmetic in hardware (AVX512_FP16, AMX-FP16)."""
    return bool({"avx512_fp16", "amx_fp16"} & cpu_flags())


def has_native_bfloat16() -> bool:
    """Return True when the CPU computes bfloat16 dot products in hardware (AVX512_BF16, AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
