"""Tests for observers: recorded ranges, qparams, state_dict, errors and distributed sync."""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mono_quant.core.layout import from_blocks, to_blocks
from mono_quant.core.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from mono_quant.core.qparams import choose_qparams, min_max
from mono_quant.core.quantize import dequantize, fake_quantize, quantize
from mono_quant.core.spec import QuantSpec

OBSERVER_NAMES = list(OBSERVERS)

# Rows of 20 elements with group_size 8 leave a padded last group in every row.
BATCH_SHAPE = (6, 20)

GRANULARITY_SPECS = [
    pytest.param(QuantSpec(), id="per_tensor"),
    pytest.param(QuantSpec(granularity="per_channel", axis=0), id="per_channel_axis0"),
    pytest.param(QuantSpec(granularity="per_channel", axis=1), id="per_channel_axis1"),
    pytest.param(QuantSpec(granularity="per_group", group_size=8), id="per_group"),
]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed))


def laplace(*shape: int, seed: int) -> torch.Tensor:
    """Draw standard Laplace samples by inverting the CDF of uniform samples."""
    uniform = torch.rand(*shape, generator=generator(seed)) - 0.5
    return -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())


def student_t(*shape: int, seed: int, df: int = 3) -> torch.Tensor:
    """Draw Student-t samples with ``df`` degrees of freedom (heavy tails)."""
    normals = torch.randn(df + 1, *shape, generator=generator(seed))
    return normals[0] / torch.sqrt(normals[1:].square().mean(dim=0))


def batches_for(seed: int, count: int = 3) -> list[torch.Tensor]:
    # Different scales per batch, so later batches extend the range.
    return [randn(*BATCH_SHAPE, seed=seed + i) * (1 + i) for i in range(count)]


def clipping_bounds(
    scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-block range that quantizes without clamping."""
    lower = (spec.quant_min - zero_point.float()) * scale
    upper = (spec.quant_max - zero_point.float()) * scale
    return lower, upper


# ---- MinMax -----------------------------------------------------------------------------------


def concatenated_min_max(
    batches: list[torch.Tensor], spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the reference per-block range of several batches without an observer."""
    if spec.granularity == "per_tensor":
        return min_max(torch.cat(batches), spec)
    if spec.granularity == "per_channel":
        # Concatenate along the other axis so the channels stay the same.
        return min_max(torch.cat(batches, dim=1 - spec.axis), spec)
    # per_group blocks depend on the row layout, so take the elementwise extremes first.
    stacked = torch.stack(batches)
    return min_max(stacked.amin(dim=0), spec)[0], min_max(stacked.amax(dim=0), spec)[1]


@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
def test_minmax_matches_concatenation(spec: QuantSpec) -> None:
    batches = batches_for(seed=10)
    observer = MinMaxObserver(spec)
    for batch in batches:
        observer(batch)

    expected_min, expected_max = concatenated_min_max(batches, spec)
    expected_scale, expected_zero_point = choose_qparams(expected_min, expected_max, spec)
    scale, zero_point = observer.calculate_qparams()

    assert torch.equal(observer.min_val, expected_min)
    assert torch.equal(observer.max_val, expected_max)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(zero_point, expected_zero_point)
    assert int(observer.num_observed) == len(batches)


# ---- round trip inside the observed range -----------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_round_trip_error_within_half_step(name: str, spec: QuantSpec, symmetric: bool) -> None:
    spec = dataclasses.replace(spec, symmetric=symmetric)
    observer = make_observer(name, spec)
    batches = batches_for(seed=20)
    for batch in batches:
        observer(batch)
    scale, zero_point = observer.calculate_qparams()

    # Clamp the data into each block's clipping range, where the error bound applies.
    x = batches[-1]
    lower, upper = clipping_bounds(scale, zero_point, spec)
    blocks = torch.clamp(to_blocks(x, spec), lower.unsqueeze(-1), upper.unsqueeze(-1))
    inside = from_blocks(blocks, spec, x.shape)

    restored = dequantize(quantize(inside, scale, zero_point, spec), scale, zero_point, spec)
    error = (restored - inside).abs()
    bound = (scale / 2 * (1 + 1e-5)).unsqueeze(-1)

    assert bool(torch.isfinite(scale).all())
    assert bool((scale > 0).all())
    assert bool((to_blocks(error, spec) <= bound).all())


# ---- Percentile -------------------------------------------------------------------------------


def test_percentile_excludes_outlier() -> None:
    x = randn(100_000, seed=30)
    x[12_345] = 1000.0
    spec = QuantSpec()
    percentile = PercentileObserver(spec, percentile=99.9)
    minmax = MinMaxObserver(spec)
    percentile(x)
    minmax(x)

    lower, upper = percentile.calculate_range()
    bin_width = (float(x.max()) - float(x.min())) / percentile.bins
    true_upper = float(torch.quantile(x, 0.999))
    percentile_scale, _ = percentile.calculate_qparams()
    minmax_scale, _ = minmax.calculate_qparams()

    assert float(upper) < 1000.0
    assert float(upper) <= true_upper + bin_width
    assert float(lower) >= float(x.min())
    assert float(percentile_scale) < float(minmax_scale) / 100


@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
def test_percentile_100_equals_minmax(spec: QuantSpec) -> None:
    percentile = PercentileObserver(spec, percentile=100)
    minmax = MinMaxObserver(spec)
    for batch in batches_for(seed=40):
        percentile(batch)
        minmax(batch)

    percentile_min, percentile_max = percentile.calculate_range()
    minmax_min, minmax_max = minmax.calculate_range()
    percentile_scale, percentile_zero_point = percentile.calculate_qparams()
    minmax_scale, minmax_zero_point = minmax.calculate_qparams()

    assert torch.equal(percentile_min, minmax_min)
    assert torch.equal(percentile_max, minmax_max)
    assert torch.equal(percentile_scale, minmax_scale)
    assert torch.equal(percentile_zero_point, minmax_zero_point)


def quantile_tolerance(
    ordered: Callable[[int], float], n: int, fraction: float, bin_width: float
) -> float:
    """Return how far a histogram percentile may lie from ``torch.quantile``.

    ``ordered(i)`` is the order statistic at 0-based rank ``i`` of ``n`` values. The histogram
    estimate is the value below which ``fraction * n`` counts lie, so it is within one bin width
    of the order statistics at ranks ``floor(fraction * n) - 1`` to ``ceil(fraction * n)``.
    ``torch.quantile`` interpolates at rank ``fraction * (n - 1)``, between the same two order
    statistics, so their gap is allowed on top of the bin width. In sparse tails that gap can
    exceed a bin.
    """
    position = fraction * n
    low = ordered(max(math.floor(position) - 1, 0))
    high = ordered(min(math.ceil(position), n - 1))
    return bin_width + (high - low)


def sorted_lookup(x: torch.Tensor) -> Callable[[int], float]:
    values = x.reshape(-1).sort().values
    return lambda index: float(values[index])


def assert_near_quantile(
    estimate: torch.Tensor, block: torch.Tensor, fraction: float, bin_width: float
) -> None:
    exact = float(torch.quantile(block, fraction))
    tolerance = quantile_tolerance(sorted_lookup(block), block.numel(), fraction, bin_width)
    assert abs(float(estimate) - exact) <= tolerance


@pytest.mark.parametrize("percentile", [99.0, 99.9], ids=["p99", "p99_9"])
@pytest.mark.parametrize(
    "spec,shape",
    [
        pytest.param(QuantSpec(), (200_000,), id="per_tensor"),
        pytest.param(QuantSpec(granularity="per_channel", axis=1), (50_000, 3), id="per_channel"),
        # Rows of 100k with groups of 40k: the last group of each row is half padding.
        pytest.param(
            QuantSpec(granularity="per_group", group_size=40_000), (2, 100_000), id="per_group"
        ),
    ],
)
def test_percentile_matches_quantile(
    spec: QuantSpec, shape: tuple[int, ...], percentile: float
) -> None:
    x = laplace(*shape, seed=50)
    observer = PercentileObserver(spec, percentile=percentile)
    observer(x)
    lower, upper = observer.calculate_range()

    blocks = to_blocks(x, spec).reshape(lower.numel(), -1)
    if spec.granularity == "per_group":
        # Drop the padding of each row's last group from the reference blocks.
        valid_lengths = [40_000, 40_000, 20_000] * shape[0]
        reference_blocks = [
            block[:length] for block, length in zip(blocks, valid_lengths, strict=True)
        ]
    else:
        reference_blocks = list(blocks)

    widths = (observer.max_val - observer.min_val).reshape(-1) / observer.bins
    for index, block in enumerate(reference_blocks):
        width = float(widths[index])
        fraction = percentile / 100
        assert_near_quantile(upper.reshape(-1)[index], block, fraction, width)
        assert_near_quantile(lower.reshape(-1)[index], block, 1 - fraction, width)


def test_percentile_rebinning_stays_close() -> None:
    # Four batches of growing scale re-bin the histogram three times.
    batches = [laplace(50_000, seed=60 + i) * (1 + i) for i in range(4)]
    x = torch.cat(batches)
    observer = PercentileObserver(QuantSpec(), percentile=99.9)
    for batch in batches:
        observer(batch)
    lower, upper = observer.calculate_range()

    # Each of the three re-binnings can move a count by one bin, on top of the direct error.
    bin_width = float(observer.max_val - observer.min_val) / observer.bins
    rebin_error = bin_width * (len(batches) - 1)
    ordered = sorted_lookup(x)
    upper_tolerance = quantile_tolerance(ordered, x.numel(), 0.999, bin_width) + rebin_error
    lower_tolerance = quantile_tolerance(ordered, x.numel(), 0.001, bin_width) + rebin_error
    assert abs(float(upper) - float(torch.quantile(x, 0.999))) <= upper_tolerance
    assert abs(float(lower) - float(torch.quantile(x, 0.001))) <= lower_tolerance


def test_percentile_beyond_quantile_limit() -> None:
    # torch.quantile rejects inputs above 2**24 (16.8M) elements; the histogram has no limit.
    # Observing 17M elements took about 1 to 2 s on a 2-core CPU.
    x = randn(17_000_000, seed=70)
    n = x.numel()
    observer = PercentileObserver(QuantSpec(), percentile=99.99)
    observer(x)
    lower, upper = observer.calculate_range()

    # Only the tails are needed as reference, so take them with topk instead of a full sort.
    tail_length = math.ceil(0.0001 * n) + 2
    top = torch.topk(x, tail_length).values
    bottom = torch.topk(x, tail_length, largest=False).values

    def ordered(index: int) -> float:
        return float(bottom[index]) if index < tail_length else float(top[n - 1 - index])

    def exact_quantile(fraction: float) -> float:
        # Linear interpolation at rank fraction * (n - 1), as torch.quantile does.
        position = fraction * (n - 1)
        below, above = ordered(math.floor(position)), ordered(math.ceil(position))
        return below + (position - math.floor(position)) * (above - below)

    bin_width = float(observer.max_val - observer.min_val) / observer.bins
    upper_tolerance = quantile_tolerance(ordered, n, 0.9999, bin_width)
    lower_tolerance = quantile_tolerance(ordered, n, 0.0001, bin_width)

    assert int(observer.histogram.sum()) == n
    assert abs(float(upper) - exact_quantile(0.9999)) <= upper_tolerance
    assert abs(float(lower) - exact_quantile(0.0001)) <= lower_tolerance


# ---- MSE --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "distribution,strictly_lower",
    [
        pytest.param(randn, False, id="normal"),
        pytest.param(laplace, True, id="laplace"),
        pytest.param(student_t, True, id="student_t"),
    ],
)
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(QuantSpec(bits=4), id="per_tensor"),
        pytest.param(QuantSpec(bits=4, granularity="per_channel"), id="per_channel"),
        pytest.param(QuantSpec(bits=4, symmetric=False, granularity="per_channel"), id="affine"),
    ],
)
def test_mse_error_at_most_minmax(spec: QuantSpec, distribution, strictly_lower: bool) -> None:
    weight = distribution(32, 512, seed=80)
    mse = MSEObserver(spec)
    minmax = MinMaxObserver(spec)
    mse(weight)
    minmax(weight)

    mse_error = (fake_quantize(weight, *mse.calculate_qparams(), spec) - weight).square().mean()
    minmax_error = (
        (fake_quantize(weight, *minmax.calculate_qparams(), spec) - weight).square().mean()
    )

    assert float(mse_error) <= float(minmax_error)
    if strictly_lower:
        assert float(mse_error) < float(minmax_error)


def test_mse_keeps_union_of_chosen_ranges() -> None:
    spec = QuantSpec(bits=4, granularity="per_channel", axis=1)
    batches = [student_t(256, 8, seed=90 + i) for i in range(3)]
    observer = MSEObserver(spec)
    singles = []
    for batch in batches:
        observer(batch)
        single = MSEObserver(spec)
        single(batch)
        singles.append(single)

    expected_min = torch.stack([single.min_val for single in singles]).amin(dim=0)
    expected_max = torch.stack([single.max_val for single in singles]).amax(dim=0)
    assert torch.equal(observer.min_val, expected_min)
    assert torch.equal(observer.max_val, expected_max)


# ---- Moving average ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
def test_moving_average_steps(spec: QuantSpec) -> None:
    constant = 0.25
    first, second = batches_for(seed=100, count=2)
    observer = MovingAverageMinMaxObserver(spec, averaging_constant=constant)

    observer(first)
    first_min, first_max = min_max(first, spec)
    assert torch.equal(observer.min_val, first_min)
    assert torch.equal(observer.max_val, first_max)

    observer(second)
    second_min, second_max = min_max(second, spec)
    torch.testing.assert_close(observer.min_val, first_min + constant * (second_min - first_min))
    torch.testing.assert_close(observer.max_val, first_max + constant * (second_max - first_max))


# ---- state_dict and dtype ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", GRANULARITY_SPECS)
@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_state_dict_round_trip(name: str, spec: QuantSpec) -> None:
    observer = make_observer(name, spec)
    for batch in batches_for(seed=110):
        observer(batch)
    scale, zero_point = observer.calculate_qparams()

    fresh = make_observer(name, spec)
    fresh.load_state_dict(observer.state_dict(), strict=True)
    fresh_scale, fresh_zero_point = fresh.calculate_qparams()

    assert fresh.observed
    assert torch.equal(fresh_scale, scale)
    assert torch.equal(fresh_zero_point, zero_point)
    for key, value in observer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_to_float64_keeps_float32_state(name: str) -> None:
    spec = QuantSpec(granularity="per_channel", axis=1)
    observer = make_observer(name, spec)
    for batch in batches_for(seed=120):
        observer(batch)
    scale, zero_point = observer.calculate_qparams()

    observer.to(torch.float64)
    moved_scale, moved_zero_point = observer.calculate_qparams()

    assert observer.min_val.dtype == torch.float32
    assert observer.max_val.dtype == torch.float32
    assert observer.num_observed.dtype == torch.int64
    assert torch.equal(moved_scale, scale)
    assert torch.equal(moved_zero_point, zero_point)

    # The observer keeps working on float64 inputs and still round-trips through a state_dict.
    observer(randn(*BATCH_SHAPE, seed=121).double())
    fresh = make_observer(name, spec)
    fresh.load_state_dict(observer.state_dict())
    assert torch.equal(fresh.calculate_qparams()[0], observer.calculate_qparams()[0])
    assert observer.min_val.dtype == torch.float32


def test_load_unobserved_state_resets() -> None:
    observer = MinMaxObserver(QuantSpec(granularity="per_channel"))
    observer(randn(*BATCH_SHAPE, seed=130))
    observer.load_state_dict(MinMaxObserver(QuantSpec(granularity="per_channel")).state_dict())

    assert not observer.observed
    assert observer.min_val.shape == (0,)


def test_percentile_load_rejects_other_bins() -> None:
    source = PercentileObserver(QuantSpec(), bins=64)
    source(randn(100, seed=140))
    target = PercentileObserver(QuantSpec(), bins=128)

    with pytest.raises(RuntimeError, match="bins=128"):
        target.load_state_dict(source.state_dict())


# ---- edge cases and errors --------------------------------------------------------------------


CONSTANT_TENSORS = [
    pytest.param(torch.zeros(*BATCH_SHAPE), id="zeros"),
    pytest.param(torch.full(BATCH_SHAPE, 3.0), id="positive"),
    pytest.param(torch.full(BATCH_SHAPE, -2.5), id="negative"),
]


@pytest.mark.parametrize("x", CONSTANT_TENSORS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_constant_tensor_scale_positive(name: str, symmetric: bool, x: torch.Tensor) -> None:
    spec = QuantSpec(symmetric=symmetric, granularity="per_group", group_size=8)
    observer = make_observer(name, spec)
    observer(x)
    scale, zero_point = observer.calculate_qparams()

    assert bool(torch.isfinite(scale).all())
    assert bool((scale > 0).all())
    assert bool((zero_point >= spec.quant_min).all())
    assert bool((zero_point <= spec.quant_max).all())


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_non_finite_raises_with_name(name: str, bad_value: float) -> None:
    observer = make_observer(name, QuantSpec())
    observer.name = "encoder.layers.0.fc1"
    x = randn(*BATCH_SHAPE, seed=150)
    x[2, 3] = bad_value

    with pytest.raises(ValueError, match=re.escape(observer.name)):
        observer(x)
    assert not observer.observed


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_no_data_raises(name: str) -> None:
    observer = make_observer(name, QuantSpec())
    observer.name = "head"

    with pytest.raises(ValueError, match="has not observed any data"):
        observer.calculate_qparams()


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_empty_tensor_ignored(name: str) -> None:
    observer = make_observer(name, QuantSpec(granularity="per_channel"))
    x = torch.empty(0, 8)

    assert observer(x) is x
    assert not observer.observed


def test_forward_returns_input() -> None:
    observer = MinMaxObserver(QuantSpec())
    x = randn(*BATCH_SHAPE, seed=160).requires_grad_()

    y = observer(x)
    y.sum().backward()

    assert y is x
    assert torch.equal(x.grad, torch.ones_like(x))
    assert not observer.min_val.requires_grad


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_inference_mode_calibration(name: str) -> None:
    # Lightning runs validation and prediction loops under torch.inference_mode.
    observer = make_observer(name, QuantSpec(granularity="per_channel"))
    with torch.inference_mode():
        for batch in batches_for(seed=230):
            observer(batch)

    assert observer.observed
    assert not observer.min_val.is_inference()
    assert bool((observer.calculate_qparams()[0] > 0).all())
    observer(randn(*BATCH_SHAPE, seed=231))
    assert int(observer.num_observed) == 4


def test_per_token_rejected() -> None:
    with pytest.raises(ValueError, match="per_token"):
        MinMaxObserver(QuantSpec(granularity="per_token"))


def test_shape_change_raises() -> None:
    observer = MinMaxObserver(QuantSpec(granularity="per_channel"))
    observer.name = "decoder.proj"
    observer(randn(4, 8, seed=170))

    with pytest.raises(ValueError, match=r"decoder\.proj.*\(4,\).*\(5,\)"):
        observer(randn(5, 8, seed=171))


def test_per_group_vector_raises_with_name() -> None:
    observer = MinMaxObserver(QuantSpec(granularity="per_group", group_size=4))
    observer.name = "norm.weight"

    with pytest.raises(ValueError, match=r"norm\.weight"):
        observer(randn(16, seed=180))


def test_make_observer_unknown_name() -> None:
    with pytest.raises(ValueError, match="minmax, moving_average, percentile, mse"):
        make_observer("histogram", QuantSpec())


@pytest.mark.parametrize(
    "name,kwargs",
    [
        pytest.param("moving_average", {"averaging_constant": 0.0}, id="averaging_zero"),
        pytest.param("moving_average", {"averaging_constant": 1.5}, id="averaging_above_one"),
        pytest.param("percentile", {"percentile": 0.0}, id="percentile_zero"),
        pytest.param("percentile", {"percentile": 40.0}, id="percentile_below_50"),
        pytest.param("percentile", {"percentile": 100.5}, id="percentile_above_100"),
        pytest.param("percentile", {"bins": 8}, id="bins_below_16"),
        pytest.param("mse", {"num_candidates": 1}, id="one_candidate"),
        pytest.param("mse", {"min_ratio": 0.0}, id="min_ratio_zero"),
        pytest.param("mse", {"min_ratio": 1.5}, id="min_ratio_above_one"),
    ],
)
def test_invalid_argument_raises(name: str, kwargs: dict[str, float]) -> None:
    argument = next(iter(kwargs))

    with pytest.raises(ValueError, match=argument):
        make_observer(name, QuantSpec(), **kwargs)


def test_observer_base_is_abstract() -> None:
    observer = Observer(QuantSpec())

    with pytest.raises(NotImplementedError):
        observer(randn(4, seed=190))


# ---- distributed sync -------------------------------------------------------------------------


WORLD_SIZE = 2
SYNC_SPECS = {
    "per_tensor": QuantSpec(),
    "per_channel": QuantSpec(granularity="per_channel", axis=1),
}


def sync_data() -> torch.Tensor:
    """Build the tensor that the ranks split; the outlier gives rank 1 a wider range."""
    data = laplace(4000, 4, seed=200)
    data[3100, 2] = 40.0
    return data


def _sync_worker(rank: int, init_method: str, out_dir: str) -> None:
    # Two ranks share the CPU, so more threads per rank only contend.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, object] = {}
    try:
        local = sync_data().chunk(WORLD_SIZE)[rank]
        for name in OBSERVER_NAMES:
            for spec_id, spec in SYNC_SPECS.items():
                observer = make_observer(name, spec)
                observer(local)
                observer.sync()
                results[f"{name}-{spec_id}"] = {
                    "range": observer.calculate_range(),
                    "qparams": observer.calculate_qparams(),
                    "num_observed": int(observer.num_observed),
                }

        idle = MinMaxObserver(QuantSpec())
        if rank == 0:
            idle(local)
        try:
            idle.sync()
        except ValueError as error:
            results["no_data_error"] = str(error)

        mismatched = MinMaxObserver(QuantSpec(granularity="per_channel", axis=1))
        mismatched(randn(10, 4 + rank, seed=210))
        try:
            mismatched.sync()
        except ValueError as error:
            results["shape_error"] = str(error)
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def single_process_reference(name: str, spec: QuantSpec) -> Observer:
    """Return an observer that saw all ranks' data in one process."""
    observer = make_observer(name, spec)
    if name == "mse":
        # The clipping search runs per observed tensor, so feed the same slices as the ranks.
        for part in sync_data().chunk(WORLD_SIZE):
            observer(part)
    else:
        observer(sync_data())
    return observer


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    tmp_path = tmp_path_factory.mktemp("sync")
    interfaces = {name for _, name in socket.if_nameindex()}
    loopback = "lo" if "lo" in interfaces else "lo0"

    with pytest.MonkeyPatch.context() as monkeypatch:
        # Keep gloo's connections on the loopback interface.
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback)
        mp.spawn(
            _sync_worker,
            args=(f"file://{tmp_path}/rendezvous", str(tmp_path)),
            nprocs=WORLD_SIZE,
            join=True,
        )
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("spec_id", list(SYNC_SPECS))
@pytest.mark.parametrize("name", ["minmax", "mse"])
def test_sync_exact_ranges(sync_results, name: str, spec_id: str) -> None:
    reference = single_process_reference(name, SYNC_SPECS[spec_id])
    expected_min, expected_max = reference.calculate_range()
    expected_scale, expected_zero_point = reference.calculate_qparams()

    for rank, results in enumerate(sync_results):
        result = results[f"{name}-{spec_id}"]
        (synced_min, synced_max), (scale, zero_point) = result["range"], result["qparams"]
        assert torch.equal(synced_min, expected_min), f"rank {rank}"
        assert torch.equal(synced_max, expected_max), f"rank {rank}"
        assert torch.equal(scale, expected_scale), f"rank {rank}"
        assert torch.equal(zero_point, expected_zero_point), f"rank {rank}"
        assert result["num_observed"] == WORLD_SIZE, f"rank {rank}"


@pytest.mark.parametrize("spec_id", list(SYNC_SPECS))
def test_sync_percentile_within_bin(sync_results, spec_id: str) -> None:
    reference = single_process_reference("percentile", SYNC_SPECS[spec_id])
    expected_min, expected_max = reference.calculate_range()
    bin_width = (reference.max_val - reference.min_val) / reference.bins

    rank0_range = sync_results[0][f"percentile-{spec_id}"]["range"]
    for rank, results in enumerate(sync_results):
        synced_min, synced_max = results[f"percentile-{spec_id}"]["range"]
        # Every rank has the same summed histogram, so the ranks agree exactly.
        assert torch.equal(synced_min, rank0_range[0]), f"rank {rank}"
        assert torch.equal(synced_max, rank0_range[1]), f"rank {rank}"
        # Re-binning onto the global range moves a count by at most one bin.
        assert bool(((synced_min - expected_min).abs() <= bin_width).all()), f"rank {rank}"
        assert bool(((synced_max - expected_max).abs() <= bin_width).all()), f"rank {rank}"


@pytest.mark.parametrize("spec_id", list(SYNC_SPECS))
def test_sync_moving_average_mean(sync_results, spec_id: str) -> None:
    spec = SYNC_SPECS[spec_id]
    parts = [min_max(part, spec) for part in sync_data().chunk(WORLD_SIZE)]
    expected_min = torch.stack([part[0] for part in parts]).mean(dim=0)
    expected_max = torch.stack([part[1] for part in parts]).mean(dim=0)

    for rank, results in enumerate(sync_results):
        synced_min, synced_max = results[f"moving_average-{spec_id}"]["range"]
        torch.testing.assert_close(synced_min, expected_min, msg=f"rank {rank}")
        torch.testing.assert_close(synced_max, expected_max, msg=f"rank {rank}")


def test_sync_without_data_raises_on_every_rank(sync_results) -> None:
    messages = [results.get("no_data_error") for results in sync_results]

    assert messages[0] is not None
    assert "has not observed any data" in messages[0]
    assert messages[1] == messages[0]


def test_sync_shape_mismatch_raises_on_every_rank(sync_results) -> None:
    for rank, results in enumerate(sync_results):
        message = results.get("shape_error")
        assert message is not None, f"rank {rank}"
        assert "different shapes" in message, f"rank {rank}"


def test_sync_without_process_group_is_noop() -> None:
    observer = MinMaxObserver(QuantSpec())
    observer(randn(*BATCH_SHAPE, seed=220))
    before = {key: value.clone() for key, value in observer.state_dict().items()}

    observer.sync()

    for key, value in observer.state_dict().items():
        assert torch.equal(value, before[key]), key
