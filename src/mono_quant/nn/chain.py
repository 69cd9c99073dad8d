"""``nn.Sequential`` that keeps activations as int8 codes between static int8 layers.

Each static quantized layer rounds its float input onto its own 8-bit grid, computes, and
returns float. In a run such as ``Conv2d, ReLU, Conv2d, ReLU, MaxPool2d, Flatten, Linear``
that costs a rounding pass per layer, a float output per layer, and a float ReLU and pooling
in between. An int8 chain instead:

1. rounds the input of the run once (``torch.quantize_per_tensor``);
2. runs each layer as an int8 kernel that rounds its int32 result straight onto the next
   layer's input grid, with a following ReLU fused into the kernel;
3. pools and flattens the 8-bit codes (max pooling commutes with rounding, so this is exact);
4. returns float from the last linear layer, or dequantizes before a final convolution.

On the digits CNN at batch 64 (1 thread, a 2-core Intel Xeon with AMX) this took the quantized
model from 0.92x to 1.9-2.3x the speed of the float model over four benchmark runs.
docs/benchmarks.md has the figures.

NOTE: the result can differ from the per-layer reference by one code of a layer's input grid.
That happens where a value lies within float rounding of a tie between two codes, because the
kernels multiply by ``1 / scale`` and round the bias to int32 (see
:mod:`mono_quant.core.kernels.quantized_conv`).

The chain runs only where the int8 kernels are exact (fbgemm or x86 engine, VNNI), in
inference, on float32 CPU inputs, and while no module of the run has hooks. A run with a
linear layer before its last also needs ``torch.use_deterministic_algorithms`` off. Otherwise
every child runs as in ``nn.Sequential``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_state

from mono_quant.core.fastpath import BufferPlan, fast_paths_enabled
from mono_quant.core.kernels.fbgemm import FBGEMM_ENGINES, fbgemm_linear
from mono_quant.core.kernels.quantized_conv import (
    pack_int8_conv2d,
    quantized_conv2d,
    quantized_conv2d_exact,
    quantized_linear,
)
from mono_quant.nn.conv import QuantConv2d
from mono_quant.nn.linear import QuantLinear
from mono_quant.nn.quantized import QuantizedLayer

CHAIN = "int8-chain"
LAYERS = "layers"

# Modules a chain passes codes through unchanged (Dropout only in eval mode).
_PASS_THROUGH = (nn.Identity, nn.Dropout)
# The engine's number is a cheaper key than torch.backends.quantized.engine's string.
_GET_QENGINE = getattr(torch._C, "_get_qengine", None)


class QuantSequential(nn.Sequential):
    """``nn.Sequential`` whose runs of static int8 layers exchange 8-bit codes.

    :func:`plan_int8_chains` turns the plain ``nn.Sequential`` containers of a quantized model
    into this class after conversion and after loading; children, names and ``state_dict``
    stay the same. :meth:`kernel_for` names the path that ``forward`` takes.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        plan = self._chain_plan(input)
        if plan is None:
            return super().forward(input)
        children = plan.children
        position = 0
        for run in plan.runs:
            for child in children[position : run.start]:
                input = child(input)
            if run.accepts(input):
                input = run(input, children)
            else:
                for child in children[run.start : run.end]:
                    input = child(input)
            position = run.end
        for child in children[position:]:
            input = child(input)
        return input

    def kernel_for(self, x: torch.Tensor) -> str:
        """Return ``"int8-chain"`` when ``forward(x)`` may run int8 chains, else ``"layers"``.

        A chain that starts at the first child also needs ``x`` to fit its first layer.
        """
        plan = self._chain_plan(x)
        if plan is None or (plan.runs[0].start == 0 and not plan.runs[0].accepts(x)):
            return LAYERS
        return CHAIN

    def int8_chains(self) -> list[list[str]]:
        """Return the child names of each int8 chain, whatever the input.

        The list is empty where no chain applies on this machine (no exact int8 kernels) or in
        this container. A chain needs two or more static int8 layers in a row, not counting a
        final convolution: no int8 convolution here returns float, so a run that ends in one
        stops before it. Convolutions with string padding (``"same"``) or a padding mode other
        than ``"zeros"`` end a run as well.
        """
        plan = self._current_plan()
        names = list(self._modules)
        return [names[run.start : run.end] for run in plan.runs]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() and friends replace the buffers that the packed weights were built from.
        self.__dict__.pop("_chain_plan_slot", None)
        return super()._apply(fn, recurse)

    def _current_plan(self) -> _ChainPlan:
        children = tuple(self._modules.values())
        engine_key = _GET_QENGINE() if _GET_QENGINE is not None else _engine()
        slot = self.__dict__.get("_chain_plan_slot")
        if slot is None:
            slot = self.__dict__["_chain_plan_slot"] = _PlanSlot()
        plan = slot.plan
        if (
            plan is None
            or plan.children != children
            or plan.engine_key != engine_key
            or not plan.is_current(_sources(plan.layers))
        ):
            plan = slot.plan = _ChainPlan(children, _engine(), engine_key)
        return plan

    def _chain_plan(self, x: torch.Tensor) -> _ChainPlan | None:
        """Return the plan when the chains may run on ``x`` in this call, else None."""
        if x.dtype != torch.float32 or not fast_paths_enabled(x):
            return None
        plan = self._current_plan()
        if not plan.runs or _has_global_hooks():
            return None
        for module in plan.members:
            if (
                module._forward_hooks
                or module._forward_pre_hooks
                or module._backward_hooks
                or module._backward_pre_hooks
            ):
                return None
        for dropout in plan.dropouts:
            if dropout.training:
                return None
        # torch (2.13) flags the int8 linear with an 8-bit output as nondeterministic, and
        # raises under torch.use_deterministic_algorithms(True), which Lightning's
        # Trainer(deterministic=True) turns on.
        if plan.has_quantized_linear and torch.are_deterministic_algorithms_enabled():
            return None
        return plan


class _PlanSlot:
    """Holds a container's plan; copies and pickles start empty, since packed weights do not
    copy and must not be saved."""

    def __init__(self) -> None:
        self.plan: _ChainPlan | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _PlanSlot:
        return _PlanSlot()

    def __reduce__(self) -> tuple[type[_PlanSlot], tuple[()]]:
        return (_PlanSlot, ())


def _engine() -> str:
    return torch.backends.quantized.engine


def _has_global_hooks() -> bool:
    return bool(
        module_state._global_forward_hooks
        or module_state._global_forward_pre_hooks
        or module_state._global_backward_hooks
        or module_state._global_backward_pre_hooks
    )


def _sources(layers: tuple[QuantizedLayer, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(tensor for layer in layers for tensor in layer.buffer_sources())


# ---- planning ----------------------------------------------------------------------------------


def _is_chain_layer(module: nn.Module) -> bool:
    """Return True for a static 8-bit layer whose int8 kernel takes and returns 8-bit codes."""
    if type(module) is QuantLinear:
        return module.activations == "static" and module.weight_spec.bits == 8
    if type(module) is not QuantConv2d:
        return False
    spec = module.weight_spec
    per_row = spec.granularity == "per_tensor" or (
        spec.granularity == "per_channel" and spec.axis in (0, -4)
    )
    return (
        module.activations == "static"
        and spec.bits == 8
        and spec.symmetric
        and per_row
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight_codes.dtype == torch.int8
    )


def _is_connector(module: nn.Module) -> bool:
    """Return True for a module that a chain applies to codes exactly."""
    if isinstance(module, (nn.ReLU, nn.Flatten, *_PASS_THROUGH)):
        return True
    if isinstance(module, nn.MaxPool2d):
        # Padding pads floats with -inf but codes with a finite value, so it is left out.
        padding = module.padding
        padded = any(padding) if isinstance(padding, tuple) else bool(padding)
        return not module.return_indices and not padded
    return False


def _static_qparams(layer: nn.Module) -> tuple[float, int]:
    return float(layer.input_scale), int(layer.input_zero_point)


class _Run:
    """One chain: children ``start`` to ``end`` (exclusive) as a list of int8 steps."""

    def __init__(self, start: int, end: int, steps: list[tuple[Any, ...]], first: nn.Module):
        self.start = start
        self.end = end
        self.steps = steps
        self.input_qparams = _static_qparams(first)
        # (allowed ranks, the axis that must match the layer, its width)
        if isinstance(first, QuantConv2d):
            self._accepts = ((4,), 1, first.in_channels)
        else:
            self._accepts = (range(2, 9), -1, first.in_features)

    def accepts(self, x: torch.Tensor) -> bool:
        """Return True when ``x`` is float32 with the rank and width of the first layer.

        Other inputs take the per-layer path, which raises the errors of the float layers.
        """
        ranks, axis, width = self._accepts
        return x.dtype == torch.float32 and x.dim() in ranks and x.shape[axis] == width

    def __call__(self, x: torch.Tensor, children: tuple[nn.Module, ...]) -> torch.Tensor:
        try:
            return self._run(x)
        except RuntimeError:
            # A shape the kernels reject (say, a Flatten that does not match the next layer).
            # The per-layer path below then raises the error the float model would raise,
            # outside this handler so that the kernel's own message does not precede it.
            pass
        for child in children[self.start : self.end]:
            x = child(x)
        return x

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self.input_qparams
        codes = torch.quantize_per_tensor(x.contiguous(), scale, zero_point, torch.quint8)
        for step in self.steps:
            kind = step[0]
            if kind == "conv":
                codes = quantized_conv2d(codes, *step[1:])
            elif kind == "linear":
                codes = quantized_linear(codes, *step[1:])
            elif kind == "maxpool":
                codes = torch.nn.functional.max_pool2d(codes, *step[1:])
            elif kind == "flatten":
                codes = codes.flatten(step[1], step[2])
            elif kind == "relu":
                codes = torch.relu(codes)
            elif kind == "linear_float":
                _, packed, input_scale, input_zero_point = step
                # Dequantized codes sit on the layer's grid, so the kernel rounds them back
                # to the same codes.
                return fbgemm_linear(codes.dequantize(), input_scale, input_zero_point, packed)
        return codes.dequantize()


class _ChainPlan(BufferPlan):
    """The int8 chains of one ``QuantSequential`` for its current children and engine."""

    def __init__(self, children: tuple[nn.Module, ...], engine: str, engine_key: int | str) -> None:
        self.children = children
        self.engine_key = engine_key
        runs = _find_runs(children, engine)
        self.runs: list[_Run] = [run for run in runs if run is not None]
        self.members = tuple(child for run in self.runs for child in children[run.start : run.end])
        self.layers = tuple(child for child in self.members if _is_chain_layer(child))
        self.dropouts = tuple(child for child in self.members if isinstance(child, nn.Dropout))
        self.has_quantized_linear = any(
            step[0] == "linear" for run in self.runs for step in run.steps
        )
        super().__init__(_sources(self.layers))


def _find_runs(children: tuple[nn.Module, ...], engine: str) -> list[_Run | None]:
    if engine not in FBGEMM_ENGINES or not any(_is_chain_layer(child) for child in children):
        return []
    runs: list[_Run | None] = []
    index = 0
    while index < len(children):
        if not _is_chain_layer(children[index]):
            index += 1
            continue
        stop = index + 1
        while stop < len(children) and (
            _is_chain_layer(children[stop]) or _is_connector(children[stop])
        ):
            stop += 1
        runs.append(_build_run(children, index, stop, engine))
        index = stop
    return runs


def _build_run(children: tuple[nn.Module, ...], start: int, stop: int, engine: str) -> _Run | None:
    """Return the chain over ``children[start:stop]``, or None when it would not pay off."""
    layers = [index for index in range(start, stop) if _is_chain_layer(children[index])]
    # No int8 convolution returns float here, so a run stops before its last one, which then
    # rounds the dequantized codes back onto the same grid in its own forward.
    end = layers[-1] + 1 if isinstance(children[layers[-1]], QuantLinear) else layers.pop()
    if len(layers) < 2:
        return None
    steps: list[tuple[Any, ...]] = []
    for index in range(start, end):
        child = children[index]
        if _is_chain_layer(child):
            step = _layer_step(children, index, end, layers, engine)
            if step is None:
                return None
            steps.append(step)
        elif isinstance(child, nn.ReLU):
            if not _is_chain_layer(children[index - 1]):
                steps.append(("relu",))
        elif isinstance(child, nn.MaxPool2d):
            steps.append(
                (
                    "maxpool",
                    child.kernel_size,
                    child.stride,
                    0,
                    child.dilation,
                    child.ceil_mode,
                )
            )
        elif isinstance(child, nn.Flatten):
            steps.append(("flatten", child.start_dim, child.end_dim))
    return _Run(start, end, steps, children[start])


def _layer_step(
    children: tuple[nn.Module, ...], index: int, end: int, layers: list[int], engine: str
) -> tuple[Any, ...] | None:
    layer = children[index]
    later = [position for position in layers if position > index]
    if isinstance(layer, QuantLinear):
        packed = layer.packed_int8_weight()
        if packed is None:
            return None
        if not later and end == index + 1:
            return ("linear_float", packed, *_static_qparams(layer))
    else:
        if not quantized_conv2d_exact(engine):
            return None
        packed = pack_int8_conv2d(
            layer.weight_codes,
            layer.weight_scale,
            layer.bias,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        if packed is None:
            return None
    # The kernel rounds onto the grid of the layer that consumes the output, which may be the
    # convolution just past the end of the run.
    consumer = later[0] if later else end
    relu = index + 1 < end and isinstance(children[index + 1], nn.ReLU)
    output_scale, output_zero_point = _static_qparams(children[consumer])
    kind = "linear" if isinstance(layer, QuantLinear) else "conv"
    return (kind, packed, relu, output_scale, output_zero_point)


def plan_int8_chains(model: nn.Module) -> list[str]:
    """Turn each plain ``nn.Sequential`` of ``model`` with two or more static int8 layers into
    a :class:`QuantSequential`, and return their names.

    Subclasses of ``nn.Sequential`` are left alone, because their own ``forward`` may differ.
    """
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module.children())
        layers = sum(_is_chain_layer(child) for child in children)
        if layers >= 2:
            module.__class__ = QuantSequential
            names.append(name)
    return names
