"""Float16/bfloat16 weight casting: the 16-bit presets."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

CAST_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class CastLayer(nn.Module):
    """Run a copy of ``module`` in a 16-bit float dtype; floating inputs and outputs keep theirs.

    Floating-point inputs are cast to ``dtype`` on the way in and outputs back to the dtype of
    the first floating input, so the layer drops into a float32 model.

    NOTE: float16 matmuls are slow on most CPUs; this preset saves memory there, not time.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in CAST_DTYPES.values():
            raise ValueError(f"dtype={dtype} is not float16 or bfloat16.")
        self.dtype = dtype
        self.module = copy.deepcopy(module).to(dtype)

    @classmethod
    def from_float(cls, module: nn.Module, dtype: torch.dtype) -> CastLayer:
        """Build a cast copy of ``module``; the float module is left unchanged."""
        return cls(module, dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
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
