"""Weight-only quantization of any parameter, for custom modules that use it functionally.

A module that calls ``F.linear(x, self.proj_weight)`` or ``x @ self.table`` itself has no
quantized counterpart. Its parameter can still be stored as integers: :func:`quantize_parameter`
registers a ``torch.nn.utils.parametrize`` parametrization that stores the codes in buffers and
returns the dequantized tensor whenever the module reads the attribute, so the module's own
``forward`` runs unchanged. The float parameter is removed; the state_dict contains
``{module}.parametrizations.{name}.0.weight_codes`` and the qparams instead.

NOTE: torch turns a parametrized module into a generated subclass, which ``torch.save(model)``
cannot pickle; save its ``state_dict`` (as ``mono_quant.io.save`` does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.quantized import QParams, QuantizedLayer


def _read_only(name: str) -> TypeError:
    return TypeError(
        f"parameter '{name}' is stored quantized and cannot be assigned; assign to the float "
        "model and quantize it again."
    )


class QuantizedParameter(QuantizedLayer):
    """Parametrization that stores one parameter as integer codes and returns it dequantized.

    Activations are never quantized: the module's own code decides what the tensor meets.
    """

    supports_static = False
    supports_dynamic = False
    weight_only_reason = "the module's own code uses it, so activations are not quantized"

    def __init__(
        self, tensor: torch.Tensor, weight_spec: QuantSpec, weight_qparams: QParams | None = None
    ) -> None:
        super().__init__(tensor, weight_spec, None, None, None, weight_qparams)
        self.output_dtype = tensor.dtype
        self._registered = False

    def forward(self) -> torch.Tensor:
        return self.dequantized_weight(self.output_dtype)

    def right_inverse(self, value: torch.Tensor) -> tuple[()]:
        """Drop the float tensor at registration (the codes are already stored); reject later."""
        if self._registered:
            raise _read_only(str(tuple(value.shape)))
        return ()


class CastParameter(nn.Module):
    """Parametrization that stores one parameter in float16/bfloat16 and returns its dtype."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.output_dtype = tensor.dtype
        self.register_buffer("weight", tensor.detach().to(dtype).clone())
        self._registered = False

    def forward(self) -> torch.Tensor:
        return self.weight.to(self.output_dtype)

    def right_inverse(self, value: torch.Tensor) -> tuple[()]:
        """Drop the float tensor at registration (the copy is already stored); reject later."""
        if self._registered:
            raise _read_only(str(tuple(value.shape)))
        return ()


def share_parameter(module: nn.Module, name: str, storage: nn.Module) -> None:
    """Register ``storage`` from :func:`quantize_parameter` for parameter ``name`` of ``module``.

    Use it when ``module.<name>`` is the same tensor as an already stored parameter (tied
    weights), so both modules read one copy and the state_dict saves it once.
    """
    if not isinstance(storage, (QuantizedParameter, CastParameter)):
        raise TypeError(f"storage must come from quantize_parameter, got {type(storage).__name__}.")
    storage._registered = False
    try:
        parametrize.register_parametrization(module, name, storage, unsafe=True)
    finally:
        storage._registered = True


def quantize_parameter(
    module: nn.Module,
    name: str,
    weight_spec: QuantSpec | None = None,
    weight_qparams: QParams | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace parameter ``name`` of ``module`` by quantized storage; return the parametrization.

    With ``weight_spec`` the parameter is stored as integer codes (:class:`QuantizedParameter`,
    qparams from ``weight_qparams`` or its min/max). With ``dtype`` (float16 or bfloat16) it is
    stored as a 16-bit copy (:class:`CastParameter`). Reading ``module.<name>`` afterwards
    returns a float tensor of the original dtype.

    Raises:
        ValueError: when ``name`` is not a floating-point parameter of ``module``, or when
            neither or both of ``weight_spec`` and ``dtype`` are given.
    """
    if (weight_spec is None) == (dtype is None):
        raise ValueError("pass exactly one of weight_spec (integer codes) and dtype (16-bit copy).")
    tensor = module._parameters.get(name)
    if tensor is None or not tensor.is_floating_point():
        candidates = sorted(
            n for n, p in module.named_parameters(recurse=False) if p.is_floating_point()
        )
        raise ValueError(
            f"{type(module).__name__} has no floating-point parameter {name!r}; name one of "
            f"{candidates}."
        )
    storage: QuantizedParameter | CastParameter
    if weight_spec is not None:
        storage = QuantizedParameter(tensor.detach(), weight_spec, weight_qparams)
    else:
        storage = CastParameter(tensor.detach(), dtype)  # type: ignore[arg-type]
    # unsafe=True skips torch's consistency check, which would call right_inverse a second time.
    parametrize.register_parametrization(module, name, storage, unsafe=True)
    storage._registered = True
    return storage
