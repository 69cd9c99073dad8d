"""Quantized ``nn.LSTM`` and ``nn.GRU``: every weight matrix integer, biases and states float.

Each layer and direction keeps its input-to-hidden and hidden-to-hidden matrices (and an LSTM's
projection ``weight_hr``) as separate quantized weights named like the float parameters, so a
state_dict contains ``weight_ih_l0_codes``, ``weight_hh_l0_reverse_scale`` and so on. Per-channel
scales are per gate row (axis 0).

Weight-only layers dequantize the matrices and run torch's fused recurrent kernel. Dynamic
layers run the recurrence step by step in Python, because each step's hidden state is quantized
per token before the hidden-to-hidden matmul. That step-by-step path is ``forward_reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import ActivationMode
from mono_quant.nn.quantized import QParams, QuantizedLayer

State = tuple[torch.Tensor, ...]
Core = Callable[[torch.Tensor, torch.Tensor | None, State], tuple[torch.Tensor, State]]


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

    def _run(self, input: torch.Tensor | PackedSequence, hx: Any, core: Core) -> tuple[Any, Any]:
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

    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        core = self._fused_core if self.activations is None else self._recurrence_core
        return self._run(input, hx, core)

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
        self, data: torch.Tensor, batch_sizes: torch.Tensor | None, state: State
    ) -> tuple[torch.Tensor, State]:
        # The same kernel call that nn.LSTM/nn.GRU.forward makes (torch 2.13), with the
        # dequantized matrices in place of the float parameters.
        hx = state if len(state) > 1 else state[0]
        weights = self._flat_tensors(data.dtype)
        common = (self.has_biases, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            result = type(self)._fused(data, hx, weights, *common, self.batch_first)
        else:
            result = type(self)._fused(data, batch_sizes, hx, weights, *common)
        return result[0], tuple(result[1:])

    def _recurrence_core(
        self, data: torch.Tensor, batch_sizes: torch.Tensor | None, state: State
    ) -> tuple[torch.Tensor, State]:
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
                output, final = self._direction(x, mask, initial, layer, direction)
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
        steps = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
        outputs: list[torch.Tensor] = [x.new_empty(0)] * x.shape[0]
        for step in steps:
            new_state = self._cell(input_gates[step], state, w_hh, b_hh, w_hr)
            if mask is not None:
                # Positions past a sequence's end keep the state, so a reverse pass starts at
                # each sequence's own last step and a forward pass ends there.
                valid = mask[step].unsqueeze(-1)
                new_state = tuple(
                    torch.where(valid, new, old) for new, old in zip(new_state, state, strict=True)
                )
            state = new_state
            outputs[step] = state[0]
        return torch.stack(outputs), state

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
