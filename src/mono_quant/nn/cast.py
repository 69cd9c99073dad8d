"""Float16/bfloat16 weight casting: the 16-bit presets."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from mono_quant.core.kernels.cache import KernelCache
from mono_quant.core.kernels.cpu import has_native_bfloat16, has_native_float16
from mono_quant.core.kernels.dense import DENSE_MAX_WEIGHT
from mono_quant.core.kernels.mode import fast_kernels_enabled
from mono_quant.core.kernels.workspace import workspace

CAST_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}

REFERENCE = "reference"
WORKSPACE = "workspace"
UPCAST = "upcast"

# Rows up to which a float16 F.linear (half the bytes of float32 to read) beats upcasting the
# weight into a float32 workspace and running float32 F.linear. For a 4096x4096 layer with
# float32 inputs (1 thread, AMD EPYC without float16 arithmetic, torch 2.13) float16 took 1.7 /
# 17 / 32 ms at 1 / 8 / 16 rows and the workspace 7.0 / 19 / 23 ms.
# NOTE: other CPUs may move the crossover. bfloat16 on CPUs with native bfloat16 dot products
# (AVX512_BF16, AMX) stays 16-bit at every size: it took 120 ms at 512 rows, float32 240 ms.
CAST_MAX_ROWS = 8
# Weight elements from which a float16 Linear runs in float16 on CPUs with float16 arithmetic
# (AVX512_FP16, AMX-FP16). On a 2-core Xeon with AVX512_FP16 (2 threads, torch 2.13), speed-up
# over float32 at 1 / 8 / 64 / 512 rows:
#   4096x4096: float16 0.91x / 1.89x / 1.16x / 1.00x, workspace 0.94x / 1.90x / 0.73x / 0.91x;
#   1024x4096: float16 0.84x / 1.21x / 1.02x / 0.95x, workspace 0.79x / 1.14x / 0.72x / 0.94x;
#   768x768: float16 0.46x / 0.43x / 0.66x / 0.85x, workspace 0.43x / 0.38x / 0.77x / 0.95x.
# NOTE: one machine and one run each, on a shared host; the crossover is an estimate.
NATIVE_FLOAT16_MIN_WEIGHT = 1 << 20


class CastLayer(nn.Module):
    """Run a copy of ``module`` in a 16-bit float dtype; floating inputs and outputs keep theirs.

    Floating-point inputs are cast to ``dtype`` on the way in and outputs back to the dtype of
    the first floating input, so the layer drops into a float32 model. That is
    :meth:`forward_reference`. For an ``nn.Linear`` with a float32 input of many rows on CPU,
    ``forward`` instead upcasts the weight into a reused float32 workspace and keeps the input
    in float32 (see :meth:`kernel_for`), which is faster where 16-bit matmuls are slow and
    rounds less than the reference. The copied parameters keep ``requires_grad``, so with grad
    mode on the reference runs; call the model under ``torch.no_grad()`` or
    ``torch.inference_mode()`` for the faster path.

    Other modules (convolutions, attention) called with float32 CPU tensors run in float32 on
    float32 copies of their 16-bit parameters and buffers (``"upcast"``): a float16 convolution
    on the digits CNN's 8x8 images took 8 times as long as float32 on a CPU without float16
    arithmetic. Modules of at most
    :data:`~mono_quant.core.kernels.dense.DENSE_MAX_WEIGHT` parameter elements keep the copies;
    larger ones convert on every call. Recurrent layers, whose weights torch keeps in one flat
    buffer, stay on the reference.

    A float16 ``nn.Linear`` with at least :data:`NATIVE_FLOAT16_MIN_WEIGHT` weights stays on
    the reference on CPUs with float16 arithmetic (AVX512_FP16, AMX-FP16), where it is faster.

    NOTE: float16 matmuls are slow on most CPUs; this preset saves memory there, not time.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in CAST_DTYPES.values():
            raise ValueError(f"dtype={dtype} is not float16 or bfloat16.")
        self.dtype = dtype
        self.module = copy.deepcopy(module).to(dtype)
        self._float32 = KernelCache()

    @classmethod
    def from_float(cls, module: nn.Module, dtype: torch.dtype) -> CastLayer:
        """Build a cast copy of ``module``; the float module is left unchanged."""
        return cls(module, dtype)

    def kernel_for(self, *args: Any, **kwargs: Any) -> str:
        """Return the path ``forward(*args, **kwargs)`` takes: ``"reference"``, ``"workspace"``
        or ``"upcast"``.

        Only ``nn.Linear`` modules called with one float32 CPU tensor can take the workspace;
        other modules except recurrent ones take ``"upcast"`` with float32 CPU inputs.
        """
        module = self.module
        if module._forward_hooks or module._forward_pre_hooks or not fast_kernels_enabled():
            return REFERENCE
        if self.dtype == torch.bfloat16 and has_native_bfloat16():
            return REFERENCE
        if (
            self.dtype == torch.float16
            and type(module) is nn.Linear
            and module.weight.numel() >= NATIVE_FLOAT16_MIN_WEIGHT
            and has_native_float16()
        ):
            return REFERENCE
        if type(module) is not nn.Linear:
            return self._upcast_kernel(args, kwargs)
        if kwargs or len(args) != 1:
            return REFERENCE
        x = args[0]
        if not torch.is_tensor(x) or x.dtype != torch.float32 or not x.is_cpu:
            return REFERENCE
        weight = module.weight
        if not weight.is_cpu or x.dim() < 1 or x.shape[-1] != module.in_features or not x.numel():
            return REFERENCE
        # The workspace is not part of the autograd graph, so gradients need the reference.
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return REFERENCE
        rows = x.numel() // module.in_features
        return WORKSPACE if rows > CAST_MAX_ROWS else REFERENCE

    def _upcast_kernel(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if isinstance(self.module, nn.RNNBase):
            return REFERENCE
        floating = [
            value
            for value in tree_flatten((args, kwargs))[0]
            if torch.is_tensor(value) and value.is_floating_point()
        ]
        if not floating or any(t.dtype != torch.float32 or not t.is_cpu for t in floating):
            return REFERENCE
        # The float32 copies are not part of the autograd graph.
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in floating)
            or any(p.requires_grad for p in self.module.parameters())
        ):
            return REFERENCE
        return UPCAST

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kernel = self.kernel_for(*args, **kwargs)
        if kernel == WORKSPACE:
            return self._forward_workspace(args[0])
        if kernel == UPCAST:
            return torch.func.functional_call(self.module, self._float32_state(), args, kwargs)
        return self.forward_reference(*args, **kwargs)

    def _float32_state(self) -> dict[str, torch.Tensor]:
        """Return float32 copies of the module's floating parameters and buffers, by name."""
        state = {
            name: tensor
            for name, tensor in (*self.module.named_parameters(), *self.module.named_buffers())
            if tensor.is_floating_point()
        }

        def build() -> dict[str, torch.Tensor]:
            return {name: tensor.float() for name, tensor in state.items()}

        if sum(tensor.numel() for tensor in state.values()) > DENSE_MAX_WEIGHT:
            return build()
        return self._float32.get("state", tuple(state.values()), build)

    def _apply(self, fn: Any, recurse: bool = True) -> CastLayer:
        self._float32.clear()
        return super()._apply(fn, recurse)

    def _forward_workspace(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        weight = workspace(tuple(module.weight.shape), torch.float32, module.weight.device)
        weight.copy_(module.weight)
        bias = None if module.bias is None else module.bias.float()
        return F.linear(x, weight, bias)

    def forward_reference(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module in ``dtype`` on inputs cast to it; outputs return to the input dtype."""
        floating = [
            a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()
        ]
        output_dtype = floating[0].dtype if floating else torch.float32

        def to_dtype(dtype: torch.dtype):
            def cast(value: Any) -> Any:
                if torch.is_tensor(value) and value.is_floating_point():
                    return value.to(dtype)
                return value

            return cast

        args, kwargs = tree_map(to_dtype(self.dtype), (args, kwargs))
        return tree_map(to_dtype(output_dtype), self.module(*args, **kwargs))
