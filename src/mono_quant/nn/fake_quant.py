"""``FakeQuantize``: the quantizer that QAT modules apply to weights and activations.

One module covers three ways of choosing qparams:

* weights without learnable scale: recomputed from the current weight on every call;
* activations without learnable scale: from an observer that updates in training mode only;
* learnable scale (LSQ, Esser et al. 2020, "Learned Step Size Quantization"): the parameter
  ``log_scale`` is initialised from the observer or the weight, then trained by the optimizer.
  Training the logarithm makes each optimizer step a relative change of the scale, so Adam's
  roughly constant step size does not swamp scales that are much smaller than the learning rate.

Flags and qparams are buffers, so a checkpoint restores them exactly. In eval mode nothing is
written: validation, test and predict leave every buffer bit-identical.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from mono_quant.core.layout import qparams_shape, to_blocks
from mono_quant.core.observers import Observer
from mono_quant.core.qparams import MIN_SCALE, choose_qparams, min_max
from mono_quant.core.quantize import fake_quantize, learned_scale_fake_quantize
from mono_quant.core.spec import QuantSpec


def _block_size(shape: torch.Size, spec: QuantSpec) -> int:
    """Return the number of elements that share one scale, without building the blocks."""
    if spec.granularity == "per_tensor":
        return math.prod(shape)
    if spec.granularity == "per_channel":
        return math.prod(shape) // max(shape[spec.axis], 1)
    if spec.granularity == "per_group":
        return cast(int, spec.group_size)
    return shape[-1] if len(shape) else 1


def _weight_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the min/max qparams of ``x``, the same as ``choose_qparams(*min_max(x, spec))``.

    ``torch.aminmax`` over the last dimension took about 2.5 times as long as ``amin`` plus
    ``amax`` on a 4096x4096 float32 weight (torch 2.13, CPU), and QAT reads every weight's range
    at every step.
    """
    blocks = to_blocks(x.detach(), spec).float()
    if blocks.shape[-1] == 0:
        return choose_qparams(*min_max(x.detach(), spec), spec)
    return choose_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), spec)


class FakeQuantize(nn.Module):
    """Quantize and dequantize a tensor in the forward pass, with a straight-through gradient.

    Args:
        spec: integer grid and granularity.
        shape: shape of the tensors this quantizer receives (weights) or ``None`` for per_tensor
            activations; it fixes the qparams shape so ``state_dict`` shapes never change.
        observer: activation range observer; ``None`` for weights, whose qparams come from the
            weight itself.
        learnable_scale: train ``scale`` as a parameter (LSQ) instead of re-deriving it.
    """

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, ...] | None = None,
        observer: Observer | None = None,
        learnable_scale: bool = False,
    ) -> None:
        super().__init__()
        if shape is None and spec.granularity != "per_tensor":
            raise ValueError(
                f"a {spec.granularity} FakeQuantize needs the tensor shape to size its qparams."
            )
        self.spec = spec
        self.observer = observer
        self.learnable_scale = learnable_scale
        scale_shape = qparams_shape(shape, spec) if shape is not None else ()

        if learnable_scale:
            self.log_scale = nn.Parameter(torch.zeros(scale_shape, dtype=torch.float32))
        else:
            self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros(scale_shape, dtype=torch.int32))
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    def current_scale(self) -> torch.Tensor:
        """Return the scale in use: the buffer, or ``exp(log_scale)`` when it is learned."""
        if self.learnable_scale:
            return self.log_scale.exp().clamp(min=MIN_SCALE)
        return self.scale

    @property
    def is_weight(self) -> bool:
        """True when qparams come from the quantized tensor itself rather than an observer."""
        return self.observer is None

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Overwrite ``scale`` and ``zero_point`` in place and mark the quantizer initialised."""
        with torch.no_grad():
            if self.learnable_scale:
                self.log_scale.copy_(scale.to(self.log_scale.device, torch.float32).log())
            else:
                self.scale.copy_(scale.to(self.scale.device, torch.float32))
            self.zero_point.copy_(zero_point.to(self.zero_point.device, torch.int32))
            self.initialized.fill_(1)

    def _refresh_qparams(self, x: torch.Tensor) -> None:
        """Update qparams from ``x`` (weights) or the observer (activations) in training mode."""
        learned = self.learnable_scale and bool(self.initialized)
        if learned and self.is_weight and self.spec.symmetric:
            # A learned symmetric weight scale needs nothing from the weight's range.
            return
        if self.is_weight:
            qparams = _weight_qparams(x, self.spec)
        else:
            assert self.observer is not None
            self.observer(x)
            qparams = self.observer.calculate_qparams()
        if not self.learnable_scale or not bool(self.initialized):
            self.set_qparams(*qparams)
        elif not self.spec.symmetric:
            # LSQ trains the scale only; the affine zero_point keeps following the observer.
            with torch.no_grad():
                self.zero_point.copy_(qparams[1])

    def current_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the qparams this quantizer applies to ``x`` right now, without changing state."""
        if self.is_weight and not self.learnable_scale and bool(self.observer_enabled):
            return _weight_qparams(x, self.spec)
        return self.current_scale().detach(), self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and bool(self.observer_enabled):
            self._refresh_qparams(x)

        if not bool(self.fake_quant_enabled) or not bool(self.initialized):
            if self.learnable_scale and self.training:
                # Keep the scale in the autograd graph so DDP finds every parameter used.
                return x + 0.0 * self.log_scale.sum()
            return x

        if self.learnable_scale:
            block = _block_size(x.shape, self.spec)
            grad_factor = 1.0 / math.sqrt(max(block, 1) * max(self.spec.quant_max, 1))
            return learned_scale_fake_quantize(
                x, self.current_scale(), self.zero_point, self.spec, grad_factor
            )
        if self.training and bool(self.observer_enabled):
            # _refresh_qparams has just stored what current_qparams would compute again from x.
            return fake_quantize(x, self.scale, self.zero_point, self.spec)
        scale, zero_point = self.current_qparams(x)
        return fake_quantize(x, scale, zero_point, self.spec)

    def extra_repr(self) -> str:
        kind = "learnable scale" if self.learnable_scale else "observed scale"
        return f"bits={self.spec.bits}, {self.spec.granularity}, {kind}"
