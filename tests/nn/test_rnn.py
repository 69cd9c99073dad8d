"""Tests for QuantLSTM and QuantGRU against float layers that hold the dequantized weights."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mono_quant.core.spec import QuantSpec
from mono_quant.nn.activation import dynamic_per_token
from mono_quant.nn.rnn import QuantGRU, QuantLSTM

# torch's oneDNN backend falls back to its own LSTM kernel for proj_size and warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

INT8 = QuantSpec(bits=8, granularity="per_channel")
INT4_G8 = QuantSpec(bits=4, granularity="per_group", group_size=8)
QUANTIZED = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU}

# (float type, constructor keyword arguments)
RNN_CASES = [
    pytest.param(nn.LSTM, {"num_layers": 1}, id="lstm"),
    pytest.param(
        nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}, id="lstm_2l_bi_bf"
    ),
    pytest.param(nn.LSTM, {"num_layers": 2, "proj_size": 5}, id="lstm_2l_proj"),
    pytest.param(nn.LSTM, {"num_layers": 1, "bias": False, "batch_first": True}, id="lstm_no_bias"),
    pytest.param(nn.GRU, {"num_layers": 1}, id="gru"),
    pytest.param(
        nn.GRU, {"num_layers": 3, "bidirectional": True, "batch_first": True}, id="gru_3l_bi_bf"
    ),
    pytest.param(nn.GRU, {"num_layers": 2, "bias": False}, id="gru_2l_no_bias"),
]
INPUT_SIZE, HIDDEN_SIZE, STEPS, BATCH = 6, 8, 7, 4


def float_rnn(rnn_type: type[nn.RNNBase], kwargs: dict, seed: int) -> nn.RNNBase:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return rnn_type(INPUT_SIZE, HIDDEN_SIZE, **kwargs).eval()


def with_dequantized(rnn: nn.RNNBase, layer) -> nn.RNNBase:
    """Return a copy of ``rnn`` whose weight matrices are the layer's dequantized weights."""
    reference = copy.deepcopy(rnn)
    with torch.no_grad():
        for name in layer.weight_names:
            getattr(reference, name).copy_(layer.dequantized_weight(name=name))
    return reference


def sequence(kwargs: dict, seed: int) -> torch.Tensor:
    shape = (BATCH, STEPS, INPUT_SIZE) if kwargs.get("batch_first") else (STEPS, BATCH, INPUT_SIZE)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def initial_state(rnn: nn.RNNBase, seed: int, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h = torch.randn(layers, batch, getattr(rnn, "proj_size", 0) or HIDDEN_SIZE, generator=generator)
    if isinstance(rnn, nn.LSTM):
        return h, torch.randn(layers, batch, HIDDEN_SIZE, generator=generator)
    return h


def flatten(outputs) -> list[torch.Tensor]:
    """Return every tensor of an RNN's ``(output, hidden)`` result, packed data included."""
    output, hidden = outputs
    tensors = [output.data if hasattr(output, "batch_sizes") else output]
    tensors += list(hidden) if isinstance(hidden, tuple) else [hidden]
    return tensors


def assert_all_close(actual, expected, atol: float) -> None:
    for got, want in zip(flatten(actual), flatten(expected), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("spec", [INT8, INT4_G8], ids=["int8", "int4_g8"])
@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_matches_dequantized_float(rnn_type, kwargs: dict, spec: QuantSpec) -> None:
    rnn = float_rnn(rnn_type, kwargs, seed=0)
    layer = QUANTIZED[rnn_type].from_float(rnn, spec)
    x = sequence(kwargs, seed=1)
    hx = initial_state(rnn, seed=2)

    expected = with_dequantized(rnn, layer)(x, hx)

    assert_all_close(layer(x, hx), expected, atol=1e-6)
    assert_all_close(layer.forward_reference(x, hx), expected, atol=1e-5)


@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_packed_sequence(rnn_type, kwargs: dict) -> None:
    rnn = float_rnn(rnn_type, kwargs, seed=3)
    layer = QUANTIZED[rnn_type].from_float(rnn, INT8)
    x = sequence(kwargs, seed=4)
    lengths = torch.tensor([5, STEPS, 1, 3])
    packed = pack_padded_sequence(x, lengths, kwargs.get("batch_first", False), False)
    hx = initial_state(rnn, seed=5)

    expected = with_dequantized(rnn, layer)(packed, hx)
    fused = layer(packed, hx)
    reference = layer.forward_reference(packed, hx)

    assert torch.equal(fused[0].batch_sizes, expected[0].batch_sizes)
    assert torch.equal(fused[0].unsorted_indices, packed.unsorted_indices)
    assert_all_close(fused, expected, atol=1e-6)
    assert_all_close(reference, expected, atol=1e-5)


@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_unbatched_input(rnn_type, kwargs: dict) -> None:
    rnn = float_rnn(rnn_type, kwargs, seed=6)
    layer = QUANTIZED[rnn_type].from_float(rnn, INT8)
    x = torch.randn(STEPS, INPUT_SIZE, generator=torch.Generator().manual_seed(7))
    state = initial_state(rnn, seed=8, batch=1)
    hx = tuple(t[:, 0] for t in state) if isinstance(state, tuple) else state[:, 0]

    expected = with_dequantized(rnn, layer)(x, hx)

    assert_all_close(layer(x, hx), expected, atol=1e-6)
    assert_all_close(layer.forward_reference(x, hx), expected, atol=1e-5)


def test_lstm_dynamic_matches_cell_loop() -> None:
    rnn = float_rnn(nn.LSTM, {"num_layers": 1}, seed=9)
    layer = QuantLSTM.from_float(rnn, INT8, activations="dynamic")
    x = sequence({}, seed=10)
    h, c = initial_state(rnn, seed=11)

    # An LSTMCell uses h only in the hidden-to-hidden matmul, so feeding it the per-token
    # quantized input and hidden state is exactly one dynamic step.
    cell = nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE)
    with torch.no_grad():
        cell.weight_ih.copy_(layer.dequantized_weight(name="weight_ih_l0"))
        cell.weight_hh.copy_(layer.dequantized_weight(name="weight_hh_l0"))
        cell.bias_ih.copy_(rnn.bias_ih_l0)
        cell.bias_hh.copy_(rnn.bias_hh_l0)
        h_t, c_t = h[0], c[0]
        steps = []
        for t in range(STEPS):
            h_t, c_t = cell(dynamic_per_token(x[t]), (dynamic_per_token(h_t), c_t))
            steps.append(h_t)
    output, (h_n, c_n) = layer(x, (h, c))

    torch.testing.assert_close(output, torch.stack(steps), rtol=0, atol=1e-5)
    torch.testing.assert_close(h_n[0], h_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_n[0], c_t, rtol=0, atol=1e-5)


def sqnr_db(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = float((reference - output).double().square().sum())
    return 10 * math.log10(float(reference.double().square().sum()) / noise)


@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_dynamic_close_to_float(rnn_type, kwargs: dict, monkeypatch) -> None:
    rnn = float_rnn(rnn_type, kwargs, seed=12)
    layer = QUANTIZED[rnn_type].from_float(rnn, INT8, activations="dynamic")
    x = sequence(kwargs, seed=13)

    with torch.no_grad():
        expected, _ = rnn(x)
    output, _ = layer(x)
    # The int8 fast path rounds its float sums in another order, within a bound that the
    # fast-path tests check. With the reference kernels, forward equals forward_reference.
    monkeypatch.setenv("MONO_QUANT_KERNELS", "reference")
    reference_output, _ = layer(x)

    assert sqnr_db(expected, output) >= 30.0
    assert torch.equal(reference_output, layer.forward_reference(x)[0])


@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_state_dict_round_trip(rnn_type, kwargs: dict) -> None:
    layer = QUANTIZED[rnn_type].from_float(float_rnn(rnn_type, kwargs, seed=14), INT4_G8)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)

    rebuilt = QUANTIZED[rnn_type].from_float(float_rnn(rnn_type, kwargs, seed=15), INT4_G8)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    x = sequence(kwargs, seed=16)

    assert "weight_hh_l0_codes" in layer.state_dict()
    for got, want in zip(flatten(rebuilt(x)), flatten(layer(x)), strict=True):
        assert torch.equal(got, want)


def test_rnn_rejects_static() -> None:
    with pytest.raises(ValueError, match="does not support static activations"):
        QuantLSTM.from_float(float_rnn(nn.LSTM, {}, seed=17), INT8, activations="static")


def test_rnn_rejects_wrong_state_shape() -> None:
    layer = QuantGRU.from_float(float_rnn(nn.GRU, {}, seed=18), INT8)

    with pytest.raises(ValueError, match=r"initial state has shape \(1, 3, 8\)"):
        layer(sequence({}, seed=19), torch.zeros(1, 3, HIDDEN_SIZE))


ACTIVATIONS = [pytest.param(None, id="weight_only"), pytest.param("dynamic", id="dynamic")]


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("rnn_type", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("features", [INPUT_SIZE - 1, INPUT_SIZE + 1])
def test_rnn_rejects_wrong_input_size(rnn_type, activations, features: int) -> None:
    # torch's fused LSTM operator returns a result for such inputs, unlike nn.LSTM.
    layer = QUANTIZED[rnn_type].from_float(float_rnn(rnn_type, {}, seed=20), INT8, activations)
    x = torch.randn(STEPS, BATCH, features)

    with torch.no_grad(), pytest.raises(ValueError, match=f"{features} features.*input_size=6"):
        layer(x)


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_rnn_rejects_integer_input(activations) -> None:
    layer = QuantLSTM.from_float(float_rnn(nn.LSTM, {}, seed=21), INT8, activations)
    x = torch.randint(0, 4, (STEPS, BATCH, INPUT_SIZE))

    with torch.no_grad(), pytest.raises(TypeError, match=r"torch\.int64.*x\.float\(\)"):
        layer(x)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_rnn_empty_batch_like_float(rnn_type, kwargs: dict, activations) -> None:
    rnn = float_rnn(rnn_type, kwargs, seed=22)
    layer = QUANTIZED[rnn_type].from_float(rnn, INT8, activations)
    shape = (0, STEPS, INPUT_SIZE) if kwargs.get("batch_first") else (STEPS, 0, INPUT_SIZE)
    x = torch.randn(shape)

    with torch.no_grad():
        output, _ = layer(x)
        expected, _ = rnn(x)

    assert output.shape == expected.shape
