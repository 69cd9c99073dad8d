"""QuantSequential: int8 chains between static layers against the per-layer reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import mono_quant
from mono_quant.core.kernels import reference_kernels
from mono_quant.core.kernels.fbgemm import fbgemm_engine, fbgemm_exact
from mono_quant.core.kernels.quantized_conv import quantized_conv2d_exact
from mono_quant.nn import QuantSequential, plan_int8_chains
from mono_quant.transform.qat import convert_qat, prepare_qat

ENGINE = fbgemm_engine()
# Lightning tests earlier in a run leave torch.use_deterministic_algorithms(True) on.
pytestmark = pytest.mark.usefixtures("nondeterministic_algorithms")
needs_kernels = pytest.mark.skipif(
    ENGINE is None or not quantized_conv2d_exact(ENGINE) or not fbgemm_exact(255, ENGINE),
    reason="int8 chains need the fbgemm or x86 engine on a VNNI CPU",
)


def _cnn() -> nn.Sequential:
    # The layout of examples/digits DigitsCNN.net.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    return images, torch.tensor(data.target)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Sequential:
    images, labels = digits
    torch.manual_seed(0)
    model = _cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(1400).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def quantized(trained, digits) -> nn.Sequential:
    images, _ = digits
    return mono_quant.quantize(trained, "w8a8", list(images[:256].split(64)))


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


def test_convert_swaps_plain_sequential(quantized) -> None:
    plain = nn.Sequential(*quantized.children())

    assert type(quantized) is QuantSequential
    assert list(quantized.state_dict()) == list(plain.state_dict())


@needs_kernels
def test_chain_covers_the_digits_cnn(quantized, digits) -> None:
    images, _ = digits

    assert quantized.int8_chains() == [[str(index) for index in range(9)]]
    with torch.no_grad():
        assert quantized.kernel_for(images[:4]) == "int8-chain"


@needs_kernels
def test_chain_matches_reference_within_rounding(trained, quantized, digits) -> None:
    images, labels = digits
    validation = images[1400:]
    with torch.no_grad():
        output = quantized(validation)
        with reference_kernels():
            reference = quantized(validation)
        floating = trained(validation)

    # The chain differs from the reference only where a value sits within float rounding of
    # a tie, which must be far below the quantization error itself.
    assert _relative_error(output, reference) <= 0.1 * _relative_error(reference, floating)
    agreement = (output.argmax(1) == reference.argmax(1)).double().mean()
    assert agreement >= 0.99
    accuracy = (output.argmax(1) == labels[1400:]).double().mean()
    assert accuracy >= (floating.argmax(1) == labels[1400:]).double().mean() - 0.01


@needs_kernels
def test_chain_is_deterministic_across_batch_sizes(quantized, digits) -> None:
    images, _ = digits
    with torch.no_grad():
        whole = quantized(images[:64])
        single = torch.cat([quantized(image[None]) for image in images[:64]])

    assert torch.equal(whole, single)


@needs_kernels
def test_hooks_run_layers(quantized, digits) -> None:
    images, _ = digits
    seen = []
    handle = quantized[2].register_forward_hook(lambda module, args, output: seen.append(1))
    try:
        with torch.no_grad():
            assert quantized.kernel_for(images[:2]) == "layers"
            quantized(images[:2])
    finally:
        handle.remove()

    assert seen == [1]


@needs_kernels
@pytest.mark.parametrize(
    "setting",
    ["reference", "grad", "float64"],
)
def test_fallback_calls_run_layers(quantized, digits, setting: str) -> None:
    x = digits[0][:2]
    if setting == "reference":
        with reference_kernels():
            assert quantized.kernel_for(x) == "layers"
    elif setting == "grad":
        assert quantized.kernel_for(x.clone().requires_grad_()) == "layers"
    else:
        assert quantized.kernel_for(x.double()) == "layers"


@needs_kernels
def test_wrong_channels_raise_float_error(quantized) -> None:
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert quantized.kernel_for(x) == "layers"
        with pytest.raises(RuntimeError, match="channels"):
            quantized(x)


@needs_kernels
def test_new_weights_rebuild_the_chain(trained, quantized, digits) -> None:
    images, _ = digits
    other = mono_quant.quantize(_cnn().eval(), "w8a8", list(images[:256].split(64)))
    model = copy.deepcopy(quantized)
    with torch.no_grad():
        before = model(images[:32])
        model.load_state_dict(other.state_dict())
        after = model(images[:32])
        with reference_kernels():
            expected = other(images[:32])

    assert not torch.equal(before, after)
    assert _relative_error(after, expected) <= 0.02


@needs_kernels
def test_deepcopy_and_save_load_keep_the_chain(quantized, trained, digits, tmp_path) -> None:
    images, _ = digits
    path = tmp_path / "cnn.mq"
    mono_quant.save(quantized, path)
    loaded = mono_quant.load(path, _cnn())
    copied = copy.deepcopy(quantized)
    with torch.no_grad():
        expected = quantized(images[:16])

        assert type(loaded) is QuantSequential
        assert torch.equal(loaded(images[:16]), expected)
        assert torch.equal(copied(images[:16]), expected)


@needs_kernels
def test_dropout_chains_in_eval_only(digits) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 96),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(96, 10),
    ).eval()
    images = digits[0]
    quantized = mono_quant.quantize(mlp, "w8a8", list(images[:128].split(64)))
    x = images[:8]

    assert quantized.int8_chains() == [["1", "2", "3", "4"]]
    with torch.no_grad():
        assert quantized.kernel_for(x) == "int8-chain"
        quantized.train()
        assert quantized.kernel_for(x) == "layers"


@needs_kernels
def test_run_stops_before_last_conv(digits) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.AdaptiveAvgPool2d(1),
    ).eval()
    images = digits[0]
    quantized = mono_quant.quantize(model, "w8a8", list(images[:128].split(64)))
    x = images[:16]
    with torch.no_grad():
        output = quantized(x)
        with reference_kernels():
            reference = quantized(x)
        floating = model(x)

    assert quantized.int8_chains() == [["0", "1", "2", "3"]]
    assert _relative_error(output, reference) <= 0.1 * _relative_error(reference, floating)


def test_subclass_and_weight_only_stay_plain(trained, digits) -> None:
    class Custom(nn.Sequential):
        pass

    images = digits[0]
    custom = Custom(*copy.deepcopy(trained))
    weight_only = mono_quant.quantize(copy.deepcopy(trained), "w8")

    assert type(mono_quant.quantize(custom, "w8a8", [images[:64]])) is Custom
    assert type(weight_only) is nn.Sequential
    assert plan_int8_chains(weight_only) == []


@needs_kernels
def test_qat_conversion_chains_folded_conv_bn(digits) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    images = digits[0]
    prepared = prepare_qat(model, mono_quant.QuantConfig(bits=8, activations="static"))
    prepared.train()
    for batch in images[:256].split(64):
        prepared(batch)
    converted = convert_qat(prepared)
    x = images[:16]
    with torch.no_grad():
        output = converted(x)
        with reference_kernels():
            reference = converted(x)

    # The folded batch norm became an Identity, which the chain passes through. A code moved
    # by one at a few elements changes the logits by far less than 1%.
    assert type(converted) is QuantSequential
    assert converted.int8_chains() == [["0", "1", "2", "3", "4"]]
    assert _relative_error(output, reference) <= 0.01


@needs_kernels
def test_deterministic_mode_runs_layers(quantized, digits) -> None:
    x = digits[0][:8]
    per_layer = nn.Sequential(*quantized.children())
    torch.use_deterministic_algorithms(True)
    with torch.no_grad():
        assert quantized.kernel_for(x) == "layers"
        assert torch.equal(quantized(x), per_layer(x))


def test_integer_input_raises_type_error(quantized, digits) -> None:
    x = (digits[0][:4] * 16).long()

    with torch.no_grad(), pytest.raises(TypeError, match=r"QuantConv2d '0'.*x\.float\(\)"):
        quantized(x)


@needs_kernels
def test_shape_error_is_the_float_models(quantized, trained) -> None:
    # A 10x10 image passes the convolutions but not the Flatten -> Linear step.
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as expected:
            trained(x)
        with pytest.raises(RuntimeError) as raised:
            quantized(x)

    assert str(raised.value) == str(expected.value)
    assert raised.value.__context__ is None
