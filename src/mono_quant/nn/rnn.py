"""Quantized ``nn.LSTM`` and ``nn.GRU``: every weight matrix integer, biases and states float.

Each layer and direction keeps its input-to-hidden and hidden-to-hidden matrices (and an LSTM's
projection ``weight_hr``) as separate quantized weights named like the float parameters, so a
state_dict contains ``weight_ih_l0_codes``, ``weight_hh_l0_reverse_scale`` and so on. Per-channel
scales are per gate row (axis 0).

Weight-only layers dequantize the matrices and run torch's fused recurrent kernel. Dynamic
layers run the recurrence step by step in Python, because each step's hidden state is quantized
per token before the hidden-to-hidden matmul. That step-by-step path is ``forward_reference``.

``forward`` picks a faster path per call (:meth:`_QuantRNNBase.kernel_for` names it). Each
dequantizes or packs the weights once per call, not once per step:

* ``"int8"`` (dynamic, 8-bit symmetric weights, VNNI CPU): the step loop with fbgemm int8
  matmuls for the input projection of all steps at once and for each step's hidden state,
  each row rounded to its own grid as the reference does
  (:mod:`mono_quant.core.rnn_kernels`);
* ``"loop"`` (weight-only, float32, batch up to :data:`LOOP_MAX_BATCH`): the step loop in
  float on weights dequantized into a reused buffer, whose time varies less than the fused
  kernel's;
* ``"fused"`` (weight-only, larger batches): torch's fused kernel on the reused buffer, equal
  to the reference fused call bit for bit;
* ``"reference"``: everything else, and ``MONO_QUANT_KERNELS=reference``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from mono_quant.core import rnn_kernels
from mono_quant.core.fastpath import (
    ROW_QPARAMS_MAX_ABS,
    BufferPlan,
    dequantize_factors,
    dequantize_into,
    dequantize_into_supported,
    fast_paths_enabled,
    workspace,
)
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import DYNAMIC_SPEC, ActivationMode, dynamic_spec
from mono_quant.nn.quantized import (
    QParams,
    QuantizedLayer,
    container_bits,
    names_layer_in_input_errors,
)

State = tuple[torch.Tensor, ...]
Core = Callable[[torch.Tensor, torch.Tensor | None, State], tuple[torch.Tensor, State]]
# Maps a hidden state h and a base tensor (or None) to base + h @ W.T for one weight matrix.
Matmul = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

# Largest batch for which the weight-only step loop runs instead of torch's fused kernel.
# Measured on LSTM(512, 512) over 32 steps, 2-core AVX512 CPU, torch 2.13, one thread. At
# batch 1 the loop took 5.1 to 5.4 ms. The fused kernel, like the float nn.LSTM, took about
# 4 ms in some processes and about 8 ms in others. At batch 2 the loop took 8.5 ms against 5 ms.
# NOTE: measured on one machine; the crossover moves with hidden size and CPU.
LOOP_MAX_BATCH = 1
# Input dtypes whose workspace dequantization rounds exactly like dequantize().
WORKSPACE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _run_steps(
    input_gates: torch.Tensor,
    state: State,
    direction: int,
    mask: torch.Tensor | None,
    cell: Callable[[torch.Tensor, State], State],
) -> tuple[torch.Tensor, State]:
    """Apply ``cell`` to each time step (last to first for ``direction`` 1); return outputs, state.

    ``input_gates`` holds one row of input projections per step. Steps where ``mask`` is False
    keep the previous state.
    """
    length = input_gates.shape[0]
    steps = range(length - 1, -1, -1) if direction else range(length)
    outputs: list[torch.Tensor] = [input_gates.new_empty(0)] * length
    for step in steps:
        new_state = cell(input_gates[step], state)
        if mask is not None:
            # Positions past a sequence's end keep the state, so a reverse pass starts at each
            # sequence's own last step and a forward pass ends there.
            valid = mask[step].unsqueeze(-1)
            new_state = tuple(
                torch.where(valid, new, old) for new, old in zip(new_state, state, strict=True)
            )
        state = new_state
        outputs[step] = state[0]
    return torch.stack(outputs), state


class _QuantRNNBase(QuantizedLayer):
    """Shared input handling and recurrence of the quantized LSTM and GRU.

    Inputs follow the float layer: batched or unbatched tensors (``batch_first`` honoured), or a
    ``PackedSequence``, and an optional initial state. Static activations are not supported,
    because the hidden state changes at every step; a static config uses dynamic activations.
    """

    supports_static = False
    static_fallback: ClassVar[ActivationMode | None] = "dynamic"
    _float_type: ClassVar[type[nn.RNNBase]]
    _fused: ClassVar[Callable[..., Any]]

    def __init__(
        self,
        module: nn.RNNBase,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        weight_qparams: dict[str, QParams | None] | None = None,
    ) -> None:
        # Static activations are rejected by the base class (supports_static is False), because
        # the hidden state's range changes at every step.
        super().__init__(
            self.float_weights(module), weight_spec, None, activations, None, weight_qparams
        )
        self.input_size = module.input_size
        self.hidden_size = module.hidden_size
        self.num_layers = module.num_layers
        self.has_biases = module.bias
        self.batch_first = module.batch_first
        self.dropout = float(module.dropout)
        self.bidirectional = module.bidirectional
        self.proj_size = getattr(module, "proj_size", 0)
        self.flat_weight_names = list(module._flat_weights_names)
        # Dropout between layers follows the mode, so the copy starts in the float layer's mode.
        self.train(module.training)
        for name in self.flat_weight_names:
            if name.startswith("bias"):
                self.register_buffer(name, getattr(module, name).detach().clone())

    @classmethod
    def float_weights(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        """Return every weight matrix of ``module`` by parameter name, in torch's flat order."""
        names = module._flat_weights_names  # type: ignore[union-attr]
        return {name: getattr(module, name) for name in names if name.startswith("weight")}

    @classmethod
    def from_float(
        cls,
        module: nn.RNNBase,
        weight_spec: QuantSpec,
        activations: ActivationMode | None = None,
        input_qparams: QParams | None = None,
        weight_qparams: dict[str, QParams | None] | None = None,
    ) -> _QuantRNNBase:
        """Build a quantized copy of ``module``; the float module is left unchanged.

        ``weight_qparams`` maps weight names (``weight_ih_l0`` ...) to qparams; a missing name
        uses that weight's min/max. ``input_qparams`` is accepted for a uniform signature and
        must be None.
        """
        if type(module) is not cls._float_type:
            raise TypeError(
                f"{cls.__name__}.from_float expects {cls._float_type.__name__}, got "
                f"{type(module).__name__}."
            )
        if input_qparams is not None:
            raise ValueError(
                f"{cls.__name__} has no static input qparams; pass input_qparams=None."
            )
        return cls(module, weight_spec, activations, weight_qparams)

    # ---- state handling ---------------------------------------------------------------------

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Return the expected shape of each state tensor for a batch of ``batch`` sequences."""
        raise NotImplementedError

    def _state_tuple(self, hx: Any) -> State:
        """Return ``hx`` as a tuple of tensors (LSTM: ``(h, c)``, GRU: ``(h,)``)."""
        raise NotImplementedError

    def _state_output(self, state: State) -> Any:
        raise NotImplementedError

    def _initial_state(
        self,
        hx: Any,
        batch: int,
        like: torch.Tensor,
        batched: bool,
        sorted_indices: torch.Tensor | None,
    ) -> State:
        shapes = self._state_shapes(batch)
        if hx is None:
            return tuple(like.new_zeros(shape) for shape in shapes)
        state = self._state_tuple(hx)
        if not batched:
            for tensor in state:
                if tensor.dim() != 2:
                    raise ValueError(
                        f"{type(self).__name__}: unbatched 2-D input needs 2-D initial states, "
                        f"got a {tensor.dim()}-D tensor."
                    )
            state = tuple(tensor.unsqueeze(1) for tensor in state)
        for tensor, shape in zip(state, shapes, strict=True):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}: initial state has shape {tuple(tensor.shape)}, "
                    f"expected {shape} (num_layers * directions, batch, hidden)."
                )
        if sorted_indices is not None:
            # A PackedSequence's rows are sorted by length; the caller's states are not.
            state = tuple(tensor.index_select(1, sorted_indices) for tensor in state)
        return state

    def _check_input(self, data: torch.Tensor) -> None:
        """Raise for inputs the float layer rejects but the fused kernels would run."""
        self.check_floating_input(data)
        # torch's fused LSTM operator (2.13) returned a result for inputs of the wrong width,
        # where the float layer raises, because nn.LSTM checks the width before calling it.
        if data.dim() >= 1 and data.size(-1) != self.input_size:
            raise ValueError(
                f"the input of {self.describe()} has {data.size(-1)} features in its last "
                f"dimension, but the layer expects input_size={self.input_size}; pass inputs "
                f"of shape (..., {self.input_size})."
            )

    def _run(self, input: torch.Tensor | PackedSequence, hx: Any, core: Core) -> tuple[Any, Any]:
        self._check_input(input.data if isinstance(input, PackedSequence) else input)
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            state = self._initial_state(hx, int(batch_sizes[0]), data, True, sorted_indices)
            output, state = core(data, batch_sizes, state)
            if unsorted_indices is not None:
                state = tuple(tensor.index_select(1, unsorted_indices) for tensor in state)
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self._state_output(state)

        if input.dim() not in (2, 3):
            raise ValueError(
                f"{type(self).__name__}: expected a 2-D (unbatched) or 3-D input, got "
                f"{input.dim()}-D."
            )
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        state = self._initial_state(hx, input.size(batch_dim), input, batched, None)
        output, state = core(input, None, state)
        if not batched:
            output = output.squeeze(batch_dim)
            state = tuple(tensor.squeeze(1) for tensor in state)
        return output, self._state_output(state)

    # ---- the two computation paths ----------------------------------------------------------

    @names_layer_in_input_errors
    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        data = input.data if isinstance(input, PackedSequence) else input
        if data.numel() == 0:
            # Nothing to quantize. torch's fused operator on the dequantized weights returns the
            # empty output, or raises for an empty sequence, as the float layer does. The step
            # loops would fail to reshape.
            return self._run(input, hx, self._fused_core)
        kernel = self.kernel_for(input, hx)
        if kernel == "fused":
            plan = self._plan()
            core = functools.partial(self._fused_core, weights=self._workspace_flat(plan, input))
        elif kernel == "loop":
            core = functools.partial(self._recurrence_core, direction_fn=self._direction_float)
        elif kernel == "int8":
            core = functools.partial(self._recurrence_core, direction_fn=self._direction_int8)
        elif self.activations is None:
            core = self._fused_core
        else:
            core = self._recurrence_core
        return self._run(input, hx, core)

    # ---- fast paths -------------------------------------------------------------------------

    def _plan(self) -> _RNNPlan:
        buffers = self._buffers
        sources = tuple(buffers[name] for name in self._plan_buffer_names())
        return self._buffer_plan(sources, _RNNPlan)

    def _plan_buffer_names(self) -> list[str]:
        names = self.__dict__.get("_plan_names")
        if names is None:
            names = [
                f"{weight}_{suffix}"
                for weight in self.weight_names
                for suffix in ("codes", "scale", "zero_point")
            ]
            names += [name for name in self.flat_weight_names if name.startswith("bias")]
            self.__dict__["_plan_names"] = names
        return names

    def _dynamic_spec(self) -> tuple[QuantSpec, bool]:
        # Mirrors quantize_input(x) of QuantizedLayer for dynamic inputs.
        granularity = getattr(self, "activation_granularity", None) or "per_token"
        if granularity == "per_token":
            return DYNAMIC_SPEC, True
        return dynamic_spec(granularity), False

    def kernel_for(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> str:
        """Return the path ``forward`` takes: ``int8``, ``loop``, ``fused`` or ``reference``."""
        data = input.data if isinstance(input, PackedSequence) else input
        if not fast_paths_enabled(data) or data.dtype not in WORKSPACE_DTYPES:
            return "reference"
        if not isinstance(input, PackedSequence) and input.dim() not in (2, 3):
            # The reference path raises the error for this input.
            return "reference"
        plan = self._plan()
        if not plan.workspace:
            return "reference"
        if self.activations is None:
            if data.dtype == torch.float32 and self._batch_size(input) <= LOOP_MAX_BATCH:
                return "loop"
            return "fused"
        if plan.int8 and data.dtype == torch.float32 and rnn_kernels.int8_linear_available():
            # The reference rejects NaN and infinity with a ValueError, which the int8 path
            # leaves to it. Checking the inputs here once, not every step, suffices: the
            # cells keep hidden states bounded (by 1, the initial state or the projection).
            states = () if hx is None else self._state_tuple(hx)
            if all(_bounded(tensor) for tensor in (data, *states)):
                return "int8"
        return "reference"

    def _batch_size(self, input: torch.Tensor | PackedSequence) -> int:
        if isinstance(input, PackedSequence):
            return int(input.batch_sizes[0])
        if input.dim() == 2:
            return 1
        return input.size(0 if self.batch_first else 1)

    def _workspace_weights(
        self, plan: _RNNPlan, names: list[str], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Dequantize weights ``names`` into their slots of this thread's workspace."""
        flat = workspace((plan.total,), dtype, plan.device)
        weights = []
        for name in names:
            start, shape = plan.slots[name]
            view = flat[start : start + plan.sizes[name]].view(shape)
            codes = plan.codes[name]
            weights.append(dequantize_into(view, codes, *plan.factors[name]))
        return weights

    def _workspace_flat(
        self, plan: _RNNPlan, input: torch.Tensor | PackedSequence
    ) -> list[torch.Tensor]:
        """Return the weights and biases in torch's flat order for the fused kernel."""
        dtype = input.data.dtype if isinstance(input, PackedSequence) else input.dtype
        weight_names = [name for name in self.flat_weight_names if name.startswith("weight")]
        dequantized = self._workspace_weights(plan, weight_names, dtype)
        weights = dict(zip(weight_names, dequantized, strict=True))
        return [
            weights[name] if name in weights else getattr(self, name).to(dtype)
            for name in self.flat_weight_names
        ]

    def _direction_float(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: State,
        layer: int,
        direction: int,
    ) -> tuple[torch.Tensor, State]:
        """Run one layer and direction of the step loop in float on workspace weights."""
        plan = self._plan()
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
        if self.proj_size:
            names.append(f"weight_hr{suffix}")
        weights = self._workspace_weights(plan, names, x.dtype)
        w_ih, w_hh = weights[0], weights[1]

        input_bias, hidden_bias = plan.biases(self, suffix)
        rows = x.reshape(-1, x.shape[-1])
        if input_bias is None:
            input_gates = torch.mm(rows, w_ih.t())
        else:
            input_gates = torch.addmm(input_bias, rows, w_ih.t())
        input_gates = input_gates.view(x.shape[0], x.shape[1], -1)

        def hidden(
            h: torch.Tensor, base: torch.Tensor | None, weight: torch.Tensor
        ) -> torch.Tensor:
            if base is None:
                return torch.mm(h, weight.t())
            return torch.addmm(base, h, weight.t())

        hidden_matmul = functools.partial(hidden, weight=w_hh)
        projection = None
        if self.proj_size:
            projection = functools.partial(hidden, weight=weights[2])
        return self._loop(
            input_gates, mask, state, direction, hidden_matmul, hidden_bias, projection
        )

    def _direction_int8(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: State,
        layer: int,
        direction: int,
    ) -> tuple[torch.Tensor, State]:
        """Run one layer and direction of the step loop with fbgemm int8 matmuls."""
        plan = self._plan()
        spec, per_token = self._dynamic_spec()
        suffix = f"_l{layer}" + ("_reverse" if direction else "")

        def matmul(
            h: torch.Tensor,
            base: torch.Tensor | None,
            packed: tuple[torch.ScriptObject, torch.Tensor],
        ) -> torch.Tensor:
            acc, scale = rnn_kernels.dynamic_int8_matmul(h, *packed, spec, per_token)
            if base is None:
                return acc.mul_(scale)
            if isinstance(scale, float):
                return torch.add(base, acc, alpha=scale)
            return torch.addcmul(base, acc, scale)

        input_bias, hidden_bias = plan.biases(self, suffix)
        # Per-token qparams depend only on each token's own row, so rounding every step's input
        # at once equals rounding step by step. per_tensor uses one pair for the whole
        # sequence, as the reference's quantize_input(x) does.
        rows = x.reshape(-1, x.shape[-1])
        input_gates = matmul(rows, input_bias, plan.packed(f"weight_ih{suffix}"))
        input_gates = input_gates.view(x.shape[0], x.shape[1], -1)

        hidden_matmul = functools.partial(matmul, packed=plan.packed(f"weight_hh{suffix}"))
        projection = None
        if self.proj_size:
            projection = functools.partial(matmul, packed=plan.packed(f"weight_hr{suffix}"))
        return self._loop(
            input_gates, mask, state, direction, hidden_matmul, hidden_bias, projection
        )

    def _loop(
        self,
        input_gates: torch.Tensor,
        mask: torch.Tensor | None,
        state: State,
        direction: int,
        hidden_matmul: Matmul,
        hidden_bias: torch.Tensor | None,
        projection: Matmul | None,
    ) -> tuple[torch.Tensor, State]:
        def cell(gates: torch.Tensor, state: State) -> State:
            return self._fast_cell(gates, state, hidden_matmul, hidden_bias, projection)

        return _run_steps(input_gates, state, direction, mask, cell)

    def _fast_cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        hidden_matmul: Matmul,
        hidden_bias: torch.Tensor | None,
        projection: Matmul | None,
    ) -> State:
        raise NotImplementedError

    def forward_reference(
        self, input: torch.Tensor | PackedSequence, hx: Any = None
    ) -> tuple[Any, Any]:
        """Run the recurrence step by step on dequantized weights; ``forward`` must match it."""
        return self._run(input, hx, self._recurrence_core)

    def _flat_tensors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [
            self.dequantized_weight(dtype, name)
            if name.startswith("weight")
            else getattr(self, name).to(dtype)
            for name in self.flat_weight_names
        ]

    def _fused_core(
        self,
        data: torch.Tensor,
        batch_sizes: torch.Tensor | None,
        state: State,
        weights: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, State]:
        # The same kernel call that nn.LSTM/nn.GRU.forward makes (torch 2.13), with the
        # dequantized matrices in place of the float parameters.
        hx = state if len(state) > 1 else state[0]
        if weights is None:
            weights = self._flat_tensors(data.dtype)
        common = (self.has_biases, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            result = type(self)._fused(data, hx, weights, *common, self.batch_first)
        else:
            result = type(self)._fused(data, batch_sizes, hx, weights, *common)
        return result[0], tuple(result[1:])

    def _recurrence_core(
        self,
        data: torch.Tensor,
        batch_sizes: torch.Tensor | None,
        state: State,
        direction_fn: Callable[..., tuple[torch.Tensor, State]] | None = None,
    ) -> tuple[torch.Tensor, State]:
        run_direction = self._direction if direction_fn is None else direction_fn
        mask = None
        if batch_sizes is None:
            x = data.transpose(0, 1) if self.batch_first else data
        else:
            # Packed data holds, for each step t, the first batch_sizes[t] sequences; the mask
            # marks those positions in a (steps, batch) grid.
            steps, batch = len(batch_sizes), int(batch_sizes[0])
            mask = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)
            mask = mask.to(data.device)
            x = data.new_zeros(steps, batch, data.shape[-1])
            x[mask] = data

        finals: list[State] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self._directions):
                index = layer * self._directions + direction
                initial = tuple(tensor[index] for tensor in state)
                output, final = run_direction(x, mask, initial, layer, direction)
                outputs.append(output)
                finals.append(final)
            x = torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        hidden = tuple(torch.stack(parts) for parts in zip(*finals, strict=True))
        if mask is not None:
            return x[mask], hidden
        return (x.transpose(0, 1) if self.batch_first else x), hidden

    def _direction(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        state: State,
        layer: int,
        direction: int,
    ) -> tuple[torch.Tensor, State]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih = self.dequantized_weight(x.dtype, f"weight_ih{suffix}")
        w_hh = self.dequantized_weight(x.dtype, f"weight_hh{suffix}")
        b_ih = getattr(self, f"bias_ih{suffix}").to(x.dtype) if self.has_biases else None
        b_hh = getattr(self, f"bias_hh{suffix}").to(x.dtype) if self.has_biases else None
        w_hr = None
        if self.proj_size:
            w_hr = self.dequantized_weight(x.dtype, f"weight_hr{suffix}")

        # Per-token qparams depend only on each token's own row, so quantizing every step's
        # input at once equals quantizing step by step, and one matmul covers all steps.
        input_gates = F.linear(self.quantize_input(x), w_ih, b_ih)

        def cell(gates: torch.Tensor, state: State) -> State:
            return self._cell(gates, state, w_hh, b_hh, w_hr)

        return _run_steps(input_gates, state, direction, mask, cell)

    def _cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        w_hh: torch.Tensor,
        b_hh: torch.Tensor | None,
        w_hr: torch.Tensor | None,
    ) -> State:
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.bidirectional:
            options += ", bidirectional=True"
        if self.batch_first:
            options += ", batch_first=True"
        if self.proj_size:
            options += f", proj_size={self.proj_size}"
        return f"{options}, {super().extra_repr()}"


def _bounded(tensor: torch.Tensor) -> bool:
    # NaN compares False, so NaN and infinity both fail.
    return tensor.numel() == 0 or bool(tensor.abs().max() <= ROW_QPARAMS_MAX_ABS)


class _RNNPlan(BufferPlan):
    """Per-layer state that the fast paths of a recurrent layer reuse; see :class:`BufferPlan`.

    Every weight matrix gets a slot in one flat workspace, so the fused kernel can read them
    all at once. The step loops fill only the slots of the direction they run.
    """

    def __init__(self, layer: _QuantRNNBase, sources: tuple[torch.Tensor | None, ...]) -> None:
        super().__init__(sources)
        spec = layer.weight_spec
        self.device = sources[0].device
        self.codes: dict[str, torch.Tensor] = {}
        self.factors: dict[str, tuple[Any, ...]] = {}
        self.slots: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.sizes: dict[str, int] = {}

        self.workspace = container_bits(spec.bits) == 8
        start = 0
        for index, name in enumerate(layer.weight_names):
            codes, scale, zero_point = sources[3 * index : 3 * index + 3]
            shape = tuple(codes.shape)
            self.workspace = self.workspace and dequantize_into_supported(spec, shape)
            if not self.workspace:
                break
            self.codes[name] = codes
            self.factors[name] = dequantize_factors(scale, zero_point, spec, shape)
            self.slots[name] = (start, shape)
            self.sizes[name] = codes.numel()
            start += codes.numel()
        self.total = start

        self.int8 = (
            self.workspace
            and layer.activations == "dynamic"
            and spec.symmetric
            and (
                spec.granularity == "per_tensor"
                or (spec.granularity == "per_channel" and spec.axis in (0, -2))
            )
        )

        self._scales = {
            name: sources[3 * index + 1] for index, name in enumerate(layer.weight_names)
        }
        self._packed: dict[str, tuple[torch.ScriptObject, torch.Tensor]] = {}
        self._biases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def packed(self, name: str) -> tuple[torch.ScriptObject, torch.Tensor]:
        """Return fbgemm's packed weight ``name`` and its scaled column sums, packed once."""
        entry = self._packed.get(name)
        if entry is None:
            entry = self._packed[name] = rnn_kernels.prepack_linear(
                self.codes[name], self._scales[name]
            )
        return entry

    def biases(
        self, layer: _QuantRNNBase, suffix: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return the bias added to the input projection and the one the cell adds itself."""
        entry = self._biases.get(suffix)
        if entry is None:
            entry = self._biases[suffix] = layer._split_biases(suffix)
        return entry


class QuantLSTM(_QuantRNNBase):
    """Quantized ``nn.LSTM``, including ``proj_size``; returns ``output, (h_n, c_n)``."""

    _float_type = nn.LSTM
    _fused = staticmethod(_VF.lstm)

    def _state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        layers = self.num_layers * self._directions
        output_size = self.proj_size or self.hidden_size
        return [(layers, batch, output_size), (layers, batch, self.hidden_size)]

    def _state_tuple(self, hx: Any) -> State:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(
                f"QuantLSTM expects the initial state as a tuple (h_0, c_0), got "
                f"{type(hx).__name__}."
            )
        return (hx[0], hx[1])

    def _state_output(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        return state[0], state[1]

    def _split_biases(self, suffix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Both biases add to the same gates, so the fast loops add their sum once, with the
        # input projection of all steps.
        if not self.has_biases:
            return None, None
        return getattr(self, f"bias_ih{suffix}") + getattr(self, f"bias_hh{suffix}"), None

    def _fast_cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        hidden_matmul: Matmul,
        hidden_bias: torch.Tensor | None,
        projection: Matmul | None,
    ) -> State:
        h, c = state
        gates = hidden_matmul(h, input_gates)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h = torch.sigmoid(o).mul_(torch.tanh(c))
        if projection is not None:
            h = projection(h, None)
        return h, c

    def _cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        w_hh: torch.Tensor,
        b_hh: torch.Tensor | None,
        w_hr: torch.Tensor | None,
    ) -> State:
        h, c = state
        gates = input_gates + F.linear(self.quantize_input(h), w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(self.quantize_input(h), w_hr)
        return h, c


class QuantGRU(_QuantRNNBase):
    """Quantized ``nn.GRU``; returns ``output, h_n``."""

    _float_type = nn.GRU
    _fused = staticmethod(_VF.gru)

    def _state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(self.num_layers * self._directions, batch, self.hidden_size)]

    def _state_tuple(self, hx: Any) -> State:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(
                f"QuantGRU expects the initial state as a tensor h_0, got {type(hx).__name__}."
            )
        return (hx,)

    def _state_output(self, state: State) -> torch.Tensor:
        return state[0]

    def _split_biases(self, suffix: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # The reset gate multiplies the hidden projection including its bias, so bias_hh stays
        # with the hidden matmul.
        if not self.has_biases:
            return None, None
        return getattr(self, f"bias_ih{suffix}"), getattr(self, f"bias_hh{suffix}")

    def _fast_cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        hidden_matmul: Matmul,
        hidden_bias: torch.Tensor | None,
        projection: Matmul | None,
    ) -> State:
        (h,) = state
        hidden_gates = hidden_matmul(h, hidden_bias)
        x_r, x_z, x_n = input_gates.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(torch.addcmul(x_n, r, h_n))
        # (1 - z) * n + z * h, with one operation fewer.
        return (torch.addcmul(n, z, h - n),)

    def _cell(
        self,
        input_gates: torch.Tensor,
        state: State,
        w_hh: torch.Tensor,
        b_hh: torch.Tensor | None,
        w_hr: torch.Tensor | None,
    ) -> State:
        (h,) = state
        hidden_gates = F.linear(self.quantize_input(h), w_hh, b_hh)
        x_r, x_z, x_n = input_gates.chunk(3, dim=-1)
        h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
