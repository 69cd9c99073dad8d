"""int8 matmuls for recurrent layers with dynamic inputs, through fbgemm.

``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` multiplies a float input, which
it rounds to uint8 with a given scale and zero_point, by a prepacked int8 weight and returns
float32. Passing codes that are already integers with scale 1 and zero_point 0 leaves them
unchanged, so the kernel computes ``sum_k q[r, k] * w[o, k] * weight_scale[o]`` exactly in
int32 before the float scaling. :func:`dynamic_int8_matmul` rounds each row (token) to its own
affine grid and subtracts the zero_point term, which reproduces the reference's per-token
rounding.

The kernel is used only on CPUs with VNNI, after a one-time self-check on the codes that
saturate without it (fbgemm adds pairs of u8 x s8 products in int16 on AVX2).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from mono_quant.core.fastpath import per_row_qparams, per_tensor_qparams, quantize_codes
from mono_quant.core.kernels.cpu import has_vnni
from mono_quant.core.spec import QuantSpec

_LINEAR_OPS = ("linear_prepack", "linear_with_input_q_dq_qweight_dq_output_fp32")


@functools.cache
def _linear_op() -> Any:
    overload = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
    # The overload's Python wrapper checks for fake script objects on every call. That costs a
    # few microseconds, more than the matmul of one token, and the C++ function skips it.
    return getattr(overload, "_op", overload)


def _linear(codes: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    return _linear_op()(codes, 1.0, 0, packed)


def prepack_linear(
    codes: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.ScriptObject, torch.Tensor]:
    """Return fbgemm's packed form of int8 ``codes`` (out, in) and the scaled column sums.

    ``scale`` is a 0-dim per_tensor scale or one scale per output row. The second value is
    ``scale[o] * sum_k codes[o, k]`` in float32, which :func:`dynamic_int8_matmul` multiplies
    by the input zero_point.

    NOTE: the packed weight is a second copy of the codes (as many bytes), kept by the caller.
    """
    rows = codes.shape[0]
    with warnings.catch_warnings():
        # torch 2.13 deprecates quantized tensors; this one only carries the codes into the
        # packing function and is dropped afterwards.
        warnings.filterwarnings("ignore", message=r".*quantized tensor", category=UserWarning)
        if scale.dim() == 0:
            weight = torch._make_per_tensor_quantized_tensor(codes, float(scale), 0)
        else:
            zero_points = torch.zeros(rows, dtype=torch.int64, device=codes.device)
            weight = torch._make_per_channel_quantized_tensor(codes, scale.double(), zero_points, 0)
        packed = torch.ops.quantized.linear_prepack(weight, None)
    column_sums = codes.sum(dim=1, dtype=torch.int32).float() * scale.float()
    return packed, column_sums


def dynamic_int8_matmul(
    x: torch.Tensor,
    packed: torch.ScriptObject,
    column_sums: torch.Tensor,
    spec: QuantSpec,
    per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Return ``(acc, scale)`` with ``acc * scale`` equal to ``dequantize(quantize(x)) @ w.T``.

    ``x`` is 2-D float32. Each row gets its own affine qparams on ``spec``'s grid (one pair
    for the whole tensor unless ``per_token``), equal to ``choose_qparams``'s. ``acc`` is
    ``sum_k (q - zero_point) * w_dequant`` per row. ``scale`` is a Python float for a single
    pair, else a (rows, 1) tensor; callers fold it and the bias in with one operation.

    NOTE: per_token qparams of several rows skip ``choose_qparams``'s NaN check and overflow
    cap (see :func:`mono_quant.core.fastpath.per_row_qparams`); callers check the inputs.
    """
    if not per_token or x.shape[0] == 1:
        # One pair: Python numbers cost less than a dozen operations on 1-element tensors.
        scale, zero_point = per_tensor_qparams(x, spec)
        codes = torch.div(x, scale)
        codes.round_().add_(zero_point).clamp_(spec.quant_min, spec.quant_max)
        acc = _linear(codes, packed)
        return acc.sub_(column_sums, alpha=zero_point), scale
    scale_rows, zero_points = per_row_qparams(x, spec)
    codes = quantize_codes(x, scale_rows, zero_points, spec)
    acc = _linear(codes, packed)
    acc.addcmul_(zero_points, column_sums, value=-1.0)
    return acc, scale_rows


def int8_linear_available() -> bool:
    """Return True when fbgemm's int8 linear is present, selected and exact on this CPU.

    The packing follows ``torch.backends.quantized.engine``, which a user may switch to
    ``qnnpack`` at any time, so the engine is checked on every call.
    """
    return torch.backends.quantized.engine in ("x86", "fbgemm") and _fbgemm_exact()


@functools.cache
def _fbgemm_exact() -> bool:
    if not has_vnni() or "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if not all(hasattr(torch.ops.quantized, name) for name in _LINEAR_OPS):
        return False
    try:
        return _self_check()
    except (RuntimeError, NotImplementedError):
        return False


def _self_check() -> bool:
    generator = torch.Generator().manual_seed(0)
    features, outputs = 256, 16
    cases = [
        (torch.full((3, features), 255.0), torch.full((outputs, features), -128)),
        (torch.full((3, features), 255.0), torch.full((outputs, features), 127)),
        (
            torch.randint(0, 256, (5, features), generator=generator).float(),
            torch.randint(-128, 128, (outputs, features), generator=generator),
        ),
    ]
    for codes, weight in cases:
        weight = weight.to(torch.int8)
        packed, _ = prepack_linear(weight, torch.ones(outputs))
        # The sums stay below 2**24 in magnitude, so float32 represents them exactly.
        expected = codes.double() @ weight.double().T
        if not torch.equal(_linear(codes, packed).double(), expected):
            warnings.warn(
                "the fbgemm int8 linear failed its numeric self-check on this CPU; quantized "
                "recurrent layers fall back to the reference path.",
                stacklevel=2,
            )
            return False
    return True
