"""Fast paths of QuantLSTM and QuantGRU against their reference paths."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mono_quant.core import rnn_kernels
from mono_quant.core.spec import QuantSpec
from mono_quant.nn.quantized import QuantizedLayer
from mono_quant.nn.rnn import LOOP_MAX_BATCH, QuantGRU, QuantLSTM

# torch's oneDNN backend falls back to its own LSTM kernel for proj_size and warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")

FLOAT32_EPS = torch.finfo(torch.float32).eps
INT8 = QuantSpec(bits=8, granularity="per_channel")
QUANTIZED = {nn.LSTM: QuantLSTM, nn.GRU: QuantGRU}
INPUT_SIZE, HIDDEN_SIZE, STEPS = 6, 8, 7
needs_int8 = pytest.mark.skipif(
    not rnn_kernels.int8_linear_available(),
    reason="the fbgemm int8 linear needs a VNNI CPU and passes its self-check only there",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test on one thread.

    torch's fused oneDNN RNN kernel synchronizes its threads at every step. On a shared 2-core
    machine, one call on these tiny shapes took over a second with 2 threads and under a
    millisecond with 1. The paths under test compute the same values either way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (float type, constructor keyword arguments)
RNN_CASES = [
    pytest.param(nn.LSTM, {}, id="lstm"),
    pytest.param(
        nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}, id="lstm_2l_bi_bf"
    ),
    pytest.param(nn.LSTM, {"num_layers": 2, "proj_size": 5}, id="lstm_2l_proj"),
    pytest.param(nn.LSTM, {"bias": False}, id="lstm_no_bias"),
    pytest.param(nn.GRU, {}, id="gru"),
    pytest.param(nn.GRU, {"num_layers": 2, "bidirectional": True}, id="gru_2l_bi"),
    pytest.param(nn.GRU, {"bias": False, "batch_first": True}, id="gru_no_bias_bf"),
]


def _layer(
    rnn_type: type[nn.RNNBase],
    kwargs: dict,
    spec: QuantSpec = INT8,
    activations: str | None = None,
    seed: int = 0,
) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rnn = rnn_type(INPUT_SIZE, HIDDEN_SIZE, **kwargs).eval()
    return QUANTIZED[rnn_type].from_float(rnn, spec, activations)


def _sequence(layer: nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, STEPS, INPUT_SIZE) if layer.batch_first else (STEPS, batch, INPUT_SIZE)
    return torch.randn(shape, generator=generator)


def _initial_state(layer: nn.Module, batch: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    layers = layer.num_layers * (2 if layer.bidirectional else 1)
    h = torch.randn(layers, batch, layer.proj_size or HIDDEN_SIZE, generator=generator) / 2
    if isinstance(layer, QuantLSTM):
        return h, torch.randn(layers, batch, HIDDEN_SIZE, generator=generator) / 2
    return h


def _tensors(result) -> list[torch.Tensor]:
    output, hidden = result
    tensors = [output.data if hasattr(output, "batch_sizes") else output]
    tensors += list(hidden) if isinstance(hidden, tuple) else [hidden]
    return tensors


def _rounding_atol(layer: nn.Module, x: torch.Tensor) -> float:
    """Return a float32 rounding tolerance for two orderings of the same recurrence.

    Each gate sums ``K`` products (inputs and hidden units), so one step differs by about
    ``(K + 4) * eps * G``, where ``G`` bounds ``sum(|x| * |w|) + |b|`` of any gate. Hidden
    states stay below 1 here (sigmoid times tanh, initial states below 1), and the
    differences of several steps add up, so the tolerance is ``STEPS`` times that.
    """
    magnitude = max(1.0, float(x.abs().max()))
    gate_bound = 0.0
    reduction = 0
    for name in layer.weight_names:
        weight = layer.dequantized_weight(name=name).abs()
        gate_bound += magnitude * float(weight.sum(dim=1).max())
        reduction += weight.shape[1]
    for name in layer.flat_weight_names:
        if name.startswith("bias"):
            gate_bound += float(getattr(layer, name).abs().max())
    return STEPS * (reduction + 4) * FLOAT32_EPS * gate_bound


def _assert_close(actual, expected, atol: float) -> None:
    for got, want in zip(_tensors(actual), _tensors(expected), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def _reference_kernels(monkeypatch: pytest.MonkeyPatch, layer: nn.Module, *args):
    with monkeypatch.context() as patch:
        patch.setenv("MONO_QUANT_KERNELS", "reference")
        with torch.no_grad():
            return layer(*args)


# ---- weight-only ---------------------------------------------------------------------------

WEIGHT_SPECS = [
    pytest.param(INT8, id="int8_per_channel"),
    pytest.param(QuantSpec(bits=8, symmetric=False), id="uint8_per_tensor"),
]
# Group size 2 divides every row here except the projection's input (5 features).
PER_GROUP = QuantSpec(bits=8, symmetric=False, granularity="per_group", group_size=2)


@pytest.mark.parametrize("spec", WEIGHT_SPECS)
@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_fused_path_equals_reference_kernels(rnn_type, kwargs, spec, monkeypatch) -> None:
    layer = _layer(rnn_type, kwargs, spec)
    batch = LOOP_MAX_BATCH + 1
    x = _sequence(layer, batch)
    hx = _initial_state(layer, batch)

    with torch.no_grad():
        kernel = layer.kernel_for(x, hx)
        result = layer(x, hx)
    expected = _reference_kernels(monkeypatch, layer, x, hx)

    assert kernel == "fused"
    for got, want in zip(_tensors(result), _tensors(expected), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("rnn_type", "kwargs"), [case for case in RNN_CASES if case.id != "lstm_2l_proj"]
)
def test_fused_path_per_group(rnn_type, kwargs, monkeypatch) -> None:
    layer = _layer(rnn_type, kwargs, PER_GROUP)
    x = _sequence(layer, LOOP_MAX_BATCH + 1)

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        result = layer(x)
    expected = _reference_kernels(monkeypatch, layer, x)

    assert kernel == "fused"
    for got, want in zip(_tensors(result), _tensors(expected), strict=True):
        assert torch.equal(got, want)


def test_fused_path_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(nn.LSTM, {})
    x = _sequence(layer, 1).to(torch.bfloat16)

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        result = layer(x)
    expected = _reference_kernels(monkeypatch, layer, x)

    assert kernel == "fused"
    for got, want in zip(_tensors(result), _tensors(expected), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_loop_path_matches_reference(rnn_type, kwargs) -> None:
    layer = _layer(rnn_type, kwargs)
    x = _sequence(layer, 1)
    hx = _initial_state(layer, 1)

    with torch.no_grad():
        kernel = layer.kernel_for(x, hx)
        result = layer(x, hx)
        expected = layer.forward_reference(x, hx)

    assert kernel == "loop"
    _assert_close(result, expected, _rounding_atol(layer, x))


def test_loop_path_unbatched_input() -> None:
    layer = _layer(nn.GRU, {})
    x = _sequence(layer, 1)[:, 0]

    with torch.no_grad():
        kernel = layer.kernel_for(x)
        result = layer(x)
        expected = layer.forward_reference(x)

    assert kernel == "loop"
    _assert_close(result, expected, _rounding_atol(layer, x))


# ---- dynamic int8 --------------------------------------------------------------------------


@needs_int8
@pytest.mark.parametrize("batch", [1, 4], ids=["batch1", "batch4"])
@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES)
def test_int8_path_matches_reference(rnn_type, kwargs, batch: int) -> None:
    layer = _layer(rnn_type, kwargs, activations="dynamic")
    x = _sequence(layer, batch)
    hx = _initial_state(layer, batch)

    with torch.no_grad():
        kernel = layer.kernel_for(x, hx)
        result = layer(x, hx)
        expected = layer.forward_reference(x, hx)

    assert kernel == "int8"
    # Both paths round every input and hidden state to the same integer codes; what is left
    # is float32 rounding of the sums.
    _assert_close(result, expected, _rounding_atol(layer, x))


@needs_int8
@pytest.mark.parametrize(("rnn_type", "kwargs"), RNN_CASES[:1] + RNN_CASES[4:5])
def test_int8_path_packed_sequence(rnn_type, kwargs) -> None:
    layer = _layer(rnn_type, kwargs, activations="dynamic")
    x = _sequence(layer, 3)
    packed = pack_padded_sequence(x, torch.tensor([7, 3, 5]), enforce_sorted=False)

    with torch.no_grad():
        kernel = layer.kernel_for(packed)
        result = layer(packed)
        expected = layer.forward_reference(packed)

    assert kernel == "int8"
    _assert_close(result, expected, _rounding_atol(layer, x))


@needs_int8
@pytest.mark.skipif(
    not hasattr(QuantizedLayer, "activation_granularity"),
    reason="this version of QuantizedLayer has only per_token dynamic inputs",
)
def test_int8_path_per_tensor_granularity() -> None:
    layer = _layer(nn.LSTM, {"num_layers": 2}, activations="dynamic")
    layer.activation_granularity = "per_tensor"
    x = _sequence(layer, 4)

    with torch.no_grad():
        result = layer(x)
        expected = layer.forward_reference(x)

    assert layer.kernel_for(x) == "int8"
    _assert_close(result, expected, _rounding_atol(layer, x))


@needs_int8
def test_int8_path_not_for_affine_weights() -> None:
    layer = _layer(nn.LSTM, {}, QuantSpec(bits=8, symmetric=False), activations="dynamic")

    assert layer.kernel_for(_sequence(layer, 2)) == "reference"


@needs_int8
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_int8_path_leaves_non_finite_to_reference(value: float) -> None:
    layer = _layer(nn.GRU, {}, activations="dynamic")
    x = _sequence(layer, 2)
    x[3, 1, 2] = value

    assert layer.kernel_for(x) == "reference"
    with pytest.raises(ValueError, match="NaN"):
        layer(x)


@needs_int8
def test_int8_path_after_load_state_dict() -> None:
    layer = _layer(nn.LSTM, {}, activations="dynamic", seed=0)
    other = _layer(nn.LSTM, {}, activations="dynamic", seed=1)
    x = _sequence(layer, 2)

    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        result = layer(x)
        expected = other.forward_reference(x)

    _assert_close(result, expected, _rounding_atol(other, x))


@needs_int8
def test_int8_path_deepcopy_after_call() -> None:
    layer = _layer(nn.GRU, {}, activations="dynamic")
    x = _sequence(layer, 2)
    with torch.no_grad():
        layer(x)

    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.weight_hh_l0_scale.mul_(2)
        result = copied(x)
        expected = copied.forward_reference(x)

    _assert_close(result, expected, _rounding_atol(copied, x))


# ---- paths that fall back to the reference -------------------------------------------------


def test_reference_switch_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(nn.LSTM, {}, activations="dynamic")
    x = _sequence(layer, 2)
    monkeypatch.setenv("MONO_QUANT_KERNELS", "reference")

    assert layer.kernel_for(x) == "reference"
    with torch.no_grad():
        for got, want in zip(_tensors(layer(x)), _tensors(layer.forward_reference(x)), strict=True):
            assert torch.equal(got, want)


def test_invalid_input_raises_reference_error() -> None:
    layer = _layer(nn.LSTM, {})

    with pytest.raises(ValueError, match="2-D"):
        layer(torch.randn(INPUT_SIZE))


def test_low_bit_weights_take_reference() -> None:
    layer = _layer(nn.GRU, {}, QuantSpec(bits=4, granularity="per_group", group_size=2))

    assert layer.kernel_for(_sequence(layer, 1)) == "reference"


def test_autograd_input_takes_reference() -> None:
    layer = _layer(nn.LSTM, {})
    x = _sequence(layer, 1).requires_grad_()

    output, _ = layer(x)
    output.sum().backward()

    assert layer.kernel_for(x) == "reference"
    assert x.grad is not None
