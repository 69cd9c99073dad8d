"""int8 convolutions through torch's oneDNN operators, with a feature check and a self-check.

``torch.ops.onednn.qconv{1,2,3}d_pointwise`` take uint8 input codes and a prepacked int8
weight, accumulate in int32 and return float32 with the bias added. That makes them a drop-in
for a convolution whose input is rounded to an affine per_tensor grid and whose weight is
symmetric 8-bit.

They are used only where they are exact and faster:

* the CPU has VNNI (AVX512-VNNI or AVX-VNNI). Without it, oneDNN adds pairs of u8 x s8
  products in int16, which saturates for codes near 255 and -128. A one-time self-check on
  such extreme codes must also match exact integer arithmetic;
* the convolution is large enough. Each call has a fixed cost of about 25 us in torch 2.13
  (primitive set-up in ATen, measured on a 2-core AVX512-VNNI CPU, one thread), against 5 to
  20 us for a whole float convolution on an 8x8 image. See :data:`MIN_MACS`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch

from mono_quant.core.kernels.cpu import has_vnni

# Multiply-accumulates per call from which the int8 kernel beats the float path. Measured with
# scripts timing 3x3 convolutions on a 2-core AVX512-VNNI CPU (torch 2.13, one thread): at 0.3M
# MACs (1x16x8x8 -> 32 channels) the int8 call took 45 us against 30 us for rounding the input
# and a float convolution, at 1.2M MACs 56 us against 85 us, and at 38M MACs 0.37 ms against
# 0.85 ms. Below MIN_REDUCTION input values per output, int8 products are too short to pay off
# unless the call is large (1x3x32x32 -> 32 channels, K=27: 58 us against 47 us).
# NOTE: measured on one machine; other CPUs may move both crossovers.
MIN_MACS = 1_000_000
MIN_REDUCTION = 32
MIN_MACS_SHORT_REDUCTION = 4_000_000

_OPS = {1: "qconv1d_pointwise", 2: "qconv2d_pointwise", 3: "qconv3d_pointwise"}


def prepack_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Return ``codes`` (int8, shape (out, in / groups, *kernel)) in oneDNN's blocked layout.

    ``scale`` has one float32 weight scale per output channel. The packed weight does not
    depend on the input qparams, so one packing serves static and dynamic inputs.
    """
    return torch.ops.onednn.qconv_prepack(
        codes, scale, 1.0, 0, list(stride), list(padding), list(dilation), groups, None
    )


def input_codes(
    x: torch.Tensor, scale: float | torch.Tensor, zero_point: float | torch.Tensor
) -> torch.Tensor:
    """Return the uint8 codes of float32 ``x`` on the affine per_tensor grid [0, 255].

    The codes equal :func:`mono_quant.core.quantize.quantize`'s exactly (same division and
    rounding) and keep ``x``'s memory format. Converting them to channels-last here cost more
    than oneDNN's own reorder: 10 ms against 4 ms for a 64x64x32x32 input (one thread).
    """
    codes = torch.div(x, scale)
    codes.round_().add_(zero_point).clamp_(0, 255)
    return codes.to(torch.uint8)


def int8_conv(
    codes: torch.Tensor,
    input_scale: float,
    input_zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Return the float32 convolution of uint8 input ``codes`` with a prepacked weight.

    Computes ``conv((codes - input_zero_point) * input_scale, weight) + bias`` where ``weight``
    is the packed int8 codes times ``weight_scale`` per output channel. Zero padding is applied
    to the dequantized input, so it pads with ``input_zero_point``. The output is in
    channels-last order.
    """
    spatial = codes.dim() - 2
    op = getattr(torch.ops.onednn, _OPS[spatial])
    zero_points = _zero_points(weight_scale.numel(), codes.device)
    return op(
        codes,
        input_scale,
        input_zero_point,
        packed,
        weight_scale,
        zero_points,
        bias,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


@functools.cache
def _zero_points(channels: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(channels, dtype=torch.int64, device=device)


@functools.cache
def int8_conv_available(spatial: int) -> bool:
    """Return True when the int8 convolution with ``spatial`` dims is present and exact here.

    Needs a VNNI CPU, oneDNN in this torch build and the operators above. The self-check runs
    a convolution on the codes that saturate without VNNI (255 against -128, and 255 against
    127) and on random codes with zero padding, and compares each with exact integer results.
    """
    if spatial not in _OPS or not has_vnni() or not torch.backends.mkldnn.is_available():
        return False
    onednn = torch.ops.onednn
    if not (hasattr(onednn, _OPS[spatial]) and hasattr(onednn, "qconv_prepack")):
        return False
    try:
        return _self_check(spatial)
    except (RuntimeError, NotImplementedError):
        return False


def _self_check(spatial: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    channels, out_channels, size = 32, 8, 5
    kernel = (3,) * spatial
    ones = (1,) * spatial
    weight_shape = (out_channels, channels, *kernel)
    input_shape = (2, channels) + (size,) * spatial
    scale = torch.ones(out_channels)
    cases = [
        (torch.full(input_shape, 255, dtype=torch.uint8), torch.full(weight_shape, -128), 0),
        (torch.full(input_shape, 255, dtype=torch.uint8), torch.full(weight_shape, 127), 0),
        (
            torch.randint(0, 256, input_shape, generator=generator, dtype=torch.uint8),
            torch.randint(-128, 128, weight_shape, generator=generator),
            1,
        ),
    ]
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}.get(
        spatial, torch.nn.functional.conv3d
    )
    for codes, weight, pad in cases:
        weight = weight.to(torch.int8)
        padding = (pad,) * spatial
        packed = prepack_weight(weight, scale, ones, padding, ones, 1)
        zero_point = 7
        output = int8_conv(codes, 1.0, zero_point, packed, scale, None, ones, padding, ones, 1)
        # The sums stay below 2**24 in magnitude, so float32 and float64 hold them exactly.
        expected = conv(codes.double() - zero_point, weight.double(), None, 1, pad)
        if not torch.equal(output.double(), expected):
            warnings.warn(
                "the oneDNN int8 convolution failed its numeric self-check on this CPU; "
                "quantized convolutions fall back to the float path.",
                stacklevel=2,
            )
            return False
    return True


def int8_conv_pays_off(
    input_shape: Sequence[int],
    out_channels: int,
    weight_shape: Sequence[int],
    stride: Sequence[int],
) -> bool:
    """Return True when an int8 call of this size beats rounding the input plus a float conv.

    The estimate of multiply-accumulates ignores padding and dilation.
    """
    reduction = math.prod(weight_shape[1:])
    outputs = input_shape[0] * out_channels * math.prod(input_shape[2:]) / math.prod(stride)
    macs = outputs * reduction
    if macs < MIN_MACS:
        return False
    return reduction >= MIN_REDUCTION or macs >= MIN_MACS_SHORT_REDUCTION


def match_memory_format(output: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``output`` in the memory format that a float convolution of ``like`` returns.

    A float convolution keeps a channels-last input channels-last and returns contiguous
    tensors otherwise; code after a convolution may rely on that, for example with ``view``.
    """
    if like.dim() == 4 and not like.is_contiguous():
        layout = torch.channels_last
    elif like.dim() == 5 and not like.is_contiguous():
        layout = torch.channels_last_3d
    else:
        return output.contiguous()
    if like.is_contiguous(memory_format=layout):
        return output.contiguous(memory_format=layout)
    return output.contiguous()
