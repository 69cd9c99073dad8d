"""Export a quantized model as a ``torch.export`` program that runs without mono_quant."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.core.kernels import reference_kernels
from mono_quant.nn.quantized import QuantizedLayer


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _foreign_calls(program: torch.export.ExportedProgram) -> list[str]:
    """Return the call targets of ``program`` that are not torch operators."""
    foreign = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
            continue
        module = getattr(target, "__module__", "") or ""
        if module.split(".")[0] in ("_operator", "operator", "torch", "math", "builtins"):
            continue
        foreign.append(f"{module}.{getattr(target, '__qualname__', target)}")
    return foreign


def _dynamic_layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLayer) and module.activations == "dynamic"
    ]


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    dynamic_shapes: Any = None,
) -> Path:
    """Write a ``torch.export`` program of ``model`` to ``path`` and return the path.

    The program contains the integer codes, scales and the graph of plain aten operators that
    dequantize them, so ``torch.export.load(path).module()`` runs it in a process where
    mono_quant is not installed. Its outputs on ``example_inputs`` are checked against
    ``model``'s, and a ``UserWarning`` is raised when they differ.

    Args:
        model: a quantized model (any ``nn.Module`` works); it is traced in eval mode and its
            training flags are restored afterwards.
        example_inputs: one input tensor, or a tuple of positional inputs.
        path: output file, conventionally ``*.pt2``.
        dynamic_shapes: passed to ``torch.export.export``; ``None`` fixes every input shape,
            for example the batch size, to the one in ``example_inputs``.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
        ValueError: when ``torch.export`` cannot trace the model. NOTE: layers with dynamic
            activations compute their qparams with a data-dependent finiteness check that
            ``torch.export`` rejects, so W8A8-dynamic models do not export yet.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    args = _as_args(example_inputs)
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        try:
            program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
        except Exception as error:
            dynamic = _dynamic_layers(model)
            hint = ""
            if dynamic:
                hint += (
                    f" Layers {dynamic} use dynamic activations, whose qparams are computed "
                    "with a data-dependent check that torch.export cannot trace; export a "
                    "static (w8a8) or weight-only model instead."
                )
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"torch.export could not trace {type(model).__name__} "
                f"({type(error).__name__}: {first_line}).{hint}"
            ) from error

        foreign = _foreign_calls(program)
        if foreign:
            raise ValueError(
                f"the exported program of {type(model).__name__} calls Python functions "
                f"{sorted(set(foreign))}, so it would need their packages to run; only torch "
                "operators are allowed in an exported quantized model."
            )

        # The traced graph holds the reference path, so the eager model is checked on it too;
        # its fast kernels round differently.
        with torch.no_grad(), reference_kernels():
            expected = model(*args)
            actual = program.module()(*args)
        if not _outputs_equal(expected, actual):
            warnings.warn(
                f"the exported program of {type(model).__name__} returns different outputs from "
                "the model on example_inputs; check layers whose forward depends on Python "
                "state other than their inputs.",
                stacklevel=2,
            )
    finally:
        for module, flag in training.items():
            module.training = flag

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _outputs_equal(expected: Any, actual: Any) -> bool:
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        return False
    for want, got in zip(expected_leaves, actual_leaves, strict=True):
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            return False
        if isinstance(want, torch.Tensor) and not torch.equal(want, got):
            return False
    return True
