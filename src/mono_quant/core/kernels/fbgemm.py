"""int8 x int8 linear on x86 CPUs through fbgemm, for layers that quantize their input.

``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32`` takes a float32 input and
its (scale, zero_point), rounds the input to uint8, multiplies with a prepacked int8 weight in
integer arithmetic and returns float32. For a 4096x4096 layer with 2 threads on an AVX-512 VNNI
CPU (torch 2.13) it ran in 0.21 / 3.5 / 43 ms at 1 / 64 / 512 rows, where float32
``F.linear`` took 4.1 / 21 / 133 ms.

The kernel rounds ``x * (1 / scale)`` where the reference rounds ``x / scale``, so an input that
sits within float rounding of a tie between two codes can land one code apart. Without VNNI, the
u8 x s8 instructions add pairs of products in int16 and saturate once input codes exceed 127;
:func:`fbgemm_exact` catches that with a numeric self-check.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from mono_quant.core.kernels.cpu import has_vnni

# quantized tensor creation is deprecated in torch (2.13) but still the only way to prepack.
_CREATION_WARNING = r".*quantized tensor creation functions"
FBGEMM_ENGINES = ("x86", "fbgemm")
_LINEAR_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def fbgemm_engine() -> str | None:
    """Return the active quantized engine when it runs linear layers through fbgemm, else None."""
    engine = torch.backends.quantized.engine
    return engine if engine in FBGEMM_ENGINES else None


def has_fbgemm_linear() -> bool:
    """Return True when the prepack and linear ops exist and the active engine is fbgemm."""
    engine = fbgemm_engine()
    return engine is not None and has_fbgemm_linear_for(engine)


def has_fbgemm_linear_for(engine: str) -> bool:
    """Return True when ``engine`` is an fbgemm engine and the prepack and linear ops exist."""
    quantized = torch.ops.quantized
    return (
        engine in FBGEMM_ENGINES
        and hasattr(quantized, "linear_prepack")
        and hasattr(quantized, _LINEAR_OP)
    )


def pack_int8_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> Any | None:
    """Prepack int8 weight codes of shape (out, in) for :func:`fbgemm_linear`.

    ``codes`` are int8 (symmetric) or uint8 (affine, with ``zero_point``) and represent
    ``(codes - zero_point) * scale``; ``scale`` is a scalar (per_tensor) or has one value per
    output row (per_channel). Returns None when the engine or the ops are missing, or packing
    fails, so the caller falls back to another path.
    """
    if not has_fbgemm_linear() or codes.device.type != "cpu" or codes.dim() != 2:
        return None
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    if codes.dtype == torch.uint8:
        # fbgemm stores weights as qint8, so unsigned codes and their zero_point shift by 128.
        codes = (codes.to(torch.int16) - 128).to(torch.int8)
        zero_point = zero_point.to(torch.int32) - 128
    elif codes.dtype != torch.int8:
        return None
    bias = None if bias is None else bias.detach().float().contiguous()
    try:
        weight = quantized_weight(codes, scale, zero_point)
        return torch.ops.quantized.linear_prepack(weight, bias)
    except (RuntimeError, NotImplementedError):
        return None


def quantized_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """Return int8 ``codes`` as a qint8 tensor for the prepack operators.

    One ``scale`` element makes it per_tensor; otherwise there is one scale and zero_point per
    slice along dim 0 (per_channel).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CREATION_WARNING, category=UserWarning)
        if scale.numel() == 1:
            return torch._make_per_tensor_quantized_tensor(
                codes.contiguous(), float(scale), int(zero_point)
            )
        channels = scale.numel()
        return torch._make_per_channel_quantized_tensor(
            codes.contiguous(),
            scale.reshape(channels).double(),
            zero_point.reshape(channels).long(),
            0,
        )


def fbgemm_linear(
    x: torch.Tensor, input_scale: float, input_zero_point: int, packed: Any
) -> torch.Tensor:
    """Compute a linear layer on float32 ``x`` rounded to uint8 with the given qparams.

    Input codes are clamped to [0, 255]. The result is float32 of shape ``(*x.shape[:-1], out)``.
    """
    return _linear_op()(x.contiguous(), input_scale, input_zero_point, packed)


@functools.cache
def _linear_op() -> Any:
    # Looked up once: resolving a torch.ops attribute costs about a microsecond per call.
    return direct_op(getattr(torch.ops.quantized, _LINEAR_OP))


def direct_op(packet: Any) -> Any:
    """Return the C++ entry point of a ``torch.ops`` operator that takes packed weights.

    Calling the packet scans every argument in Python for fake script objects first (torch
    2.13), which added about 5 us to each int8 call on an 8x8 image. Those objects exist only
    under tracing, where the fast paths never run. Falls back to the packet itself where a
    torch version lacks the attribute.
    """
    return getattr(packet, "_op", packet)


@functools.cache
def _self_check(engine: str, input_quant_max: int) -> bool:
    """Compare the kernel with exact integer arithmetic on inputs that trigger int16 saturation.

    The input codes are ``input_quant_max`` and the weight codes alternate between -128 and 127,
    so each pair of products reaches ``2 * 127 * input_quant_max``, past int16 for 8-bit inputs.
    """
    out_features, in_features = 16, 64
    generator = torch.Generator().manual_seed(0)
    codes = torch.where(
        torch.rand(out_features, in_features, generator=generator) < 0.5,
        torch.tensor(-128, dtype=torch.int8),
        torch.tensor(127, dtype=torch.int8),
    )
    scale = torch.rand(out_features, generator=generator) * 0.01 + 0.001
    packed = pack_int8_weight(codes, scale, None, None)
    if packed is None:
        return False
    input_scale, input_zero_point = 0.05, 3
    input_codes = torch.full((4, in_features), input_quant_max, dtype=torch.float64)
    input_codes[1] = torch.randint(0, input_quant_max + 1, (in_features,), generator=generator)
    x = ((input_codes - input_zero_point) * input_scale).float()
    try:
        output = fbgemm_linear(x, input_scale, input_zero_point, packed)
    except (RuntimeError, NotImplementedError):
        return False
    exact = (input_codes - input_zero_point) @ codes.double().T * (scale.double() * input_scale)
    # Float32 rounding of the requantization is far below the error of one saturated pair.
    tolerance = 1e-5 * float(exact.abs().max()) + 1e-6
    return float((output.double() - exact).abs().max()) <= tolerance


def fbgemm_exact(input_quant_max: int, engine: str | None = None) -> bool:
    """Return True when the kernel computes exact int8 products for codes up to the given max.

    For 8-bit inputs (``input_quant_max`` 255) this needs a CPU with VNNI, because the AVX2 and
    AVX-512 u8 x s8 instructions saturate. Inputs up to 127 never saturate. ``engine`` is the
    active quantized engine when the caller has read it already.
    """
    engine = engine or fbgemm_engine()
    if engine not in FBGEMM_ENGINES:
        return False
    return _exact(engine, input_quant_max)


@functools.cache
def _exact(engine: str, input_quant_max: int) -> bool:
    # Cached per engine: layers ask on every call, and the operator lookups cost about 1 us.
    if not has_fbgemm_linear_for(engine):
        return False
    if input_quant_max > 127 and not has_vnni():
        return False
    return _self_check(engine, input_quant_max)
