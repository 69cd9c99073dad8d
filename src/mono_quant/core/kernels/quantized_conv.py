"""int8 2-D convolution and linear layers with quantized outputs, through ``torch.ops.quantized``.

``torch.ops.quantized.conv2d`` (and ``conv2d_relu``) take a quint8 input tensor and a prepacked
qint8 weight, accumulate in int32 and round the result straight onto the next layer's input
grid. A chain of such calls keeps activations as 8-bit codes from one layer to the next, which
is what :class:`mono_quant.nn.QuantSequential` does.

Two numeric differences from the per-layer reference, both at most one output code and only
for values within float rounding of a tie between two codes:

* the kernel rounds the float bias to int32 at ``input_scale * weight_scale`` before adding it;
* it requantizes with one float32 multiplier ``input_scale * weight_scale / output_scale``.

Like the int8 linear kernel (:mod:`mono_quant.core.kernels.fbgemm`), the u8 x s8 products
saturate in int16 on CPUs without VNNI; :func:`quantized_conv2d_exact` checks for that once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from mono_quant.core.kernels.cpu import has_vnni
from mono_quant.core.kernels.fbgemm import FBGEMM_ENGINES, direct_op, quantized_weight

# Quantized tensor creation is deprecated in torch 2.13 but still the only way to prepack.
_CREATION_WARNING = r".*quantized tensor creation functions"


def has_quantized_conv2d(engine: str) -> bool:
    """Return True when ``engine`` is an fbgemm engine and the conv2d ops exist in this torch."""
    quantized = torch.ops.quantized
    return engine in FBGEMM_ENGINES and all(
        hasattr(quantized, name) for name in ("conv2d_prepack", "conv2d", "conv2d_relu")
    )


def pack_int8_conv2d(
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Any | None:
    """Prepack symmetric int8 weight ``codes`` (out, in / groups, kh, kw) for the quantized ops.

    ``scale`` is a scalar (per_tensor) or has one value per output channel. Returns None when
    packing fails, so the caller keeps its other paths.
    """
    bias = None if bias is None else bias.detach().float().contiguous()
    try:
        weight = quantized_weight(codes, scale, torch.zeros_like(scale, dtype=torch.int32))
        return torch.ops.quantized.conv2d_prepack(
            weight, bias, list(stride), list(padding), list(dilation), groups
        )
    except (RuntimeError, NotImplementedError):
        return None


def quantized_conv2d(
    codes: torch.Tensor, packed: Any, relu: bool, output_scale: float, output_zero_point: int
) -> torch.Tensor:
    """Return the quint8 convolution of quint8 ``codes``, rounded onto the output grid."""
    return _conv_op(relu)(codes, packed, output_scale, output_zero_point)


def quantized_linear(
    codes: torch.Tensor, packed: Any, relu: bool, output_scale: float, output_zero_point: int
) -> torch.Tensor:
    """Return the quint8 linear layer of quint8 ``codes``, rounded onto the output grid.

    ``packed`` comes from :func:`mono_quant.core.kernels.fbgemm.pack_int8_weight`.
    """
    return _linear_op(relu)(codes, packed, output_scale, output_zero_point)


@functools.cache
def _conv_op(relu: bool) -> Any:
    quantized = torch.ops.quantized
    return direct_op(quantized.conv2d_relu if relu else quantized.conv2d)


@functools.cache
def _linear_op(relu: bool) -> Any:
    quantized = torch.ops.quantized
    return direct_op(quantized.linear_relu if relu else quantized.linear)


def quantized_conv2d_exact(engine: str) -> bool:
    """Return True when the engine's int8 convolution matches integer arithmetic here.

    Needs VNNI for input codes up to 255, and a numeric self-check on codes that saturate
    without it. Cached per engine.
    """
    if not has_quantized_conv2d(engine) or not has_vnni():
        return False
    return _self_check(engine)


@functools.cache
def _self_check(engine: str) -> bool:
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        return _compare_with_integers()
    except (RuntimeError, NotImplementedError):
        return False
    finally:
        torch.backends.quantized.engine = previous


def _compare_with_integers() -> bool:
    generator = torch.Generator().manual_seed(0)
    channels, out_channels = 32, 8
    weight = torch.where(
        torch.rand(out_channels, channels, 3, 3, generator=generator) < 0.5,
        torch.tensor(-128, dtype=torch.int8),
        torch.tensor(127, dtype=torch.int8),
    )
    weight_scale = torch.rand(out_channels, generator=generator) * 0.01 + 0.001
    packed = pack_int8_conv2d(weight, weight_scale, None, (1, 1), (1, 1), (1, 1), 1)
    if packed is None:
        return False
    # Codes at 255 make every pair of products exceed int16; one sample is random.
    codes = torch.full((2, channels, 5, 5), 255, dtype=torch.uint8)
    codes[1] = torch.randint(0, 256, (channels, 5, 5), generator=generator, dtype=torch.uint8)
    input_scale, input_zero_point = 0.02, 7
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CREATION_WARNING, category=UserWarning)
        quantized = torch._make_per_tensor_quantized_tensor(codes, input_scale, input_zero_point)
    exact = torch.nn.functional.conv2d(
        (codes.double() - input_zero_point) * input_scale,
        weight.double() * weight_scale.double().view(-1, 1, 1, 1),
        padding=1,
    )
    # An output grid wide enough that saturation moves results by many codes.
    output_scale = float(exact.abs().max()) / 100
    output = quantized_conv2d(quantized, packed, False, output_scale, 128)
    expected = (exact / output_scale).round() + 128
    return float((output.int_repr().double() - expected).abs().max()) <= 1
