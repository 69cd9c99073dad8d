"""Calibration wrapper: a float layer plus the observer of its input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant.core.observers import Observer


class ObservedLayer(nn.Module):
    """Run the float ``module`` unchanged and record the range of its first input.

    ``prepare`` swaps these in for the layers that need static activation ranges; ``convert``
    swaps them out again. ``name`` is the layer's qualified name, used in error messages.
    """

    def __init__(self, module: nn.Module, input_observer: Observer, name: str) -> None:
        super().__init__()
        self.module = module
        self.input_observer = input_observer
        self.input_observer.name = f"the input of layer '{name}'"
        self.name = name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                f"layer '{self.name}' received a {type(x).__name__} input during calibration, but "
                "static activation quantization needs a floating-point tensor; exclude this layer "
                "or use activations='dynamic' or None."
            )
        self.input_observer(x)
        return self.module(x, *args, **kwargs)
