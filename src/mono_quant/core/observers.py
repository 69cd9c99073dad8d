"""Observers: record the range of the tensors passed through a layer and turn it into qparams.

An observer is a ``torch.nn.Module`` that is called on a tensor during calibration, returns the
tensor unchanged and updates its state (running ranges, a histogram) in buffers, so the state
moves with ``.to()`` and is saved by ``state_dict``. After calibration,
:meth:`Observer.calculate_qparams` returns ``(scale, zero_point)`` for the observer's spec.

Observers work per block (see :mod:`mono_quant.core.layout`): per_tensor, per_channel and
per_group specs are supported. per_token ranges depend on each input, so they are computed at run
time and never observed.

Choosing an observer:

* ``minmax``: the exact range seen; best for weights and well-behaved activations.
* ``moving_average``: smooths batch-to-batch variation of activation ranges.
* ``percentile``: clips rare outliers of activations, for example after GELU or in attention.
* ``mse``: searches the clipping range that minimizes the quantization error; best for weights
  at 4 bits or fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mono_quant.core.layout import to_blocks
from mono_quant.core.qparams import check_finite, choose_qparams, min_max
from mono_quant.core.spec import QuantSpec

__all__ = [
    "OBSERVERS",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

# Non-per_token qparams have at most two dimensions: () per_tensor, (C,) per_channel and
# (rows, groups) per_group. sync() exchanges shapes padded to this length.
_MAX_QPARAMS_DIMS = 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Observer(torch.nn.Module):
    """Base class: record per-block ranges of observed tensors and compute qparams from them.

    Subclasses implement :meth:`_update` (fold one tensor into the state) and may override
    :meth:`_range` (turn the state into a clipping range) and :meth:`_sync_state`.

    State lives in float32 buffers ``min_val`` and ``max_val`` shaped like the qparams, and an
    int64 scalar buffer ``num_observed``. Their shapes are only known after the first tensor, so
    they start with shape ``(0,)`` and are resized then, and loading a ``state_dict`` resizes them
    to the incoming shapes.

    Floating-point buffers stay float32 under ``.to(dtype)``, ``.half()`` or ``.double()``, and
    only their device follows the module, because ranges would lose precision in float16. The
    qparams are float32 whatever the model's dtype.

    Args:
        spec: quantization spec that the qparams are computed for; per_token is rejected.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    num_observed: torch.Tensor

    # Buffers whose shape depends on the observed tensors, resized when a state_dict is loaded.
    _data_shaped_buffers: tuple[str, ...] = ("min_val", "max_val")

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}.")
        if spec.granularity == "per_token":
            raise ValueError(
                "granularity='per_token' cannot be observed: per-token ranges depend on each "
                "input and are computed at run time. Use dynamic quantization for per-token "
                "activations, or a per_tensor/per_channel spec for a static observer."
            )
        self.spec = spec
        self.name = ""
        # With torch.distributed initialized, reduce each batch's min/max across ranks before
        # folding it in. Training-time observers use this so every rank keeps the same state.
        # NOTE: only the min/max is reduced; a histogram observer still bins local values.
        self.reduce_batch_ranges = False
        self.register_buffer("min_val", torch.empty(0, dtype=torch.float32))
        self.register_buffer("max_val", torch.empty(0, dtype=torch.float32))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.int64))

    # ---- public API -------------------------------------------------------------------------

    @property
    def observed(self) -> bool:
        """Whether at least one non-empty tensor has been observed."""
        return bool(self.num_observed > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record the range of ``x`` and return ``x`` unchanged; empty tensors are ignored."""
        if x.numel() == 0:
            return x
        check_finite(x, f"the tensor observed by {self._label()}")

        with torch.no_grad():
            values = x.detach().float()
            try:
                batch_min, batch_max = min_max(values, self.spec)
            except ValueError as error:
                raise ValueError(f"{self._label()} cannot observe this tensor: {error}") from error

            if self.observed and batch_min.shape != self.min_val.shape:
                raise ValueError(
                    f"{self._label()} recorded qparams of shape {tuple(self.min_val.shape)} but "
                    f"the tensor of shape {tuple(x.shape)} needs {tuple(batch_min.shape)} for a "
                    f"{self.spec.granularity} spec; observe tensors with the same channel and "
                    "group layout, or use a separate observer for each."
                )
            if self.reduce_batch_ranges and _distributed():
                # Every rank folds the same union-of-batches range into its state, so the state
                # stays identical across ranks without a separate sync() step.
                dist.all_reduce(batch_min, op=dist.ReduceOp.MIN)
                dist.all_reduce(batch_max, op=dist.ReduceOp.MAX)
            self._update(values, batch_min, batch_max)
            self.num_observed += 1
        return x

    def calculate_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float32 clipping range ``(min, max)`` that the qparams are computed from."""
        if not self.observed:
            raise ValueError(
                f"{self._label()} has not observed any data, so it has no range to compute "
                "qparams from. Run calibration batches through the model before converting it."
            )
        return self._range()

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scale, zero_point)`` for the observed range (see ``choose_qparams``)."""
        min_val, max_val = self.calculate_range()
        return choose_qparams(min_val, max_val, self.spec)

    def sync(self, group: Any = None) -> None:
        """Reduce the state across the ranks of ``group``; do nothing when not distributed.

        Afterwards every rank has the state that one observer would have after seeing the data
        of all ranks. This is exact for min/max ranges, and each subclass documents its
        approximation. Every rank of the group must call this, and every rank must have observed
        at least one tensor of the same qparams shape, or else every rank raises ``ValueError``.

        Call it once per calibration, because a second call adds ``num_observed`` (and the
        percentile observer's histogram counts) of all ranks again.
        """
        if not _distributed():
            return
        self._check_sync_ready(group)
        self._sync_state(group)
        dist.all_reduce(self.num_observed, op=dist.ReduceOp.SUM, group=group)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, name={self.name!r}"

    # ---- subclass hooks ---------------------------------------------------------------------

    def _update(self, x: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        """Fold one float32 tensor and its per-block min/max into the state."""
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.float(), self.max_val.float()

    def _sync_state(self, group: Any) -> None:
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX, group=group)

    # ---- helpers ----------------------------------------------------------------------------

    def _label(self) -> str:
        kind = type(self).__name__
        return f"{kind} for {self.name}" if self.name else f"an unnamed {kind}"

    def _store(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` into buffer ``name`` in place, keeping the buffer's device and dtype."""
        buffer = getattr(self, name)
        if buffer.shape != value.shape:
            buffer.resize_(value.shape)
        buffer.copy_(value)

    def _store_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        self._store("min_val", min_val)
        self._store("max_val", max_val)

    def _check_sync_ready(self, group: Any) -> None:
        """Raise the same ``ValueError`` on every rank unless all ranks observed one shape."""
        shape = tuple(self.min_val.shape) if self.observed else ()
        dims = list(shape) + [0] * (_MAX_QPARAMS_DIMS - len(shape))
        local = torch.tensor(
            [int(self.observed), len(shape), *dims], dtype=torch.int64, device=self.min_val.device
        )
        # One MIN reduction of (v, -v) yields both the minimum and the maximum over ranks.
        reduced = torch.cat([local, -local])
        dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=group)
        lowest, highest = reduced[: local.numel()], -reduced[local.numel() :]

        if int(lowest[0]) == 0:
            raise ValueError(
                f"{self._label()} cannot sync: at least one rank has not observed any data. "
                "Give every rank calibration batches before calling sync()."
            )
        if not torch.equal(lowest[1:], highest[1:]):
            raise ValueError(
                f"{self._label()} cannot sync: the ranks recorded qparams of different shapes "
                f"(this rank: {shape}); observe tensors with the same layout on every rank."
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Observer:
        # Keep float32 state float32: apply fn for its device, then move the original values.
        originals = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Resize data-shaped buffers first so that the default loader's shape check passes.
        for name in self._data_shaped_buffers:
            incoming = state_dict.get(prefix + name)
            buffer = self._buffers.get(name)
            if (
                isinstance(incoming, torch.Tensor)
                and buffer is not None
                and buffer.shape != incoming.shape
            ):
                buffer.resize_(incoming.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class MinMaxObserver(Observer):
    """Record the running per-block minimum and maximum of every observed tensor.

    Use it for weights (observed once, so the range is exact) and for activations whose range has
    no rare outliers. One outlier widens the range and costs resolution for every other value; use
    :class:`PercentileObserver` or :class:`MSEObserver` then.
    """

    def _update(self, x: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        if self.observed:
            batch_min = torch.minimum(batch_min, self.min_val.to(batch_min.device))
            batch_max = torch.maximum(batch_max, self.max_val.to(batch_max.device))
        self._store_range(batch_min, batch_max)


class MovingAverageMinMaxObserver(Observer):
    """Track an exponential moving average of each batch's per-block minimum and maximum.

    The first tensor sets the range. Each later one moves it by ``averaging_constant``:
    ``min += averaging_constant * (batch_min - min)``, and likewise for ``max``. Use it for
    activations whose range varies from batch to batch, where the union of all batches (as
    :class:`MinMaxObserver` records it) would be dominated by a few extreme batches.

    Args:
        spec: quantization spec.
        averaging_constant: weight of each new batch, in ``(0, 1]``; 1 keeps the last batch only.
    """

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01) -> None:
        super().__init__(spec)
        if isinstance(averaging_constant, bool) or not isinstance(averaging_constant, int | float):
            raise TypeError(
                f"averaging_constant must be a float in (0, 1], got {averaging_constant!r}."
            )
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(
                f"averaging_constant={averaging_constant} is outside (0, 1]; typical values are "
                "0.01 to 0.1."
            )
        self.averaging_constant = float(averaging_constant)

    def _update(self, x: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        if self.observed:
            min_val = self.min_val.to(batch_min.device)
            max_val = self.max_val.to(batch_max.device)
            batch_min = min_val + self.averaging_constant * (batch_min - min_val)
            batch_max = max_val + self.averaging_constant * (batch_max - max_val)
        self._store_range(batch_min, batch_max)

    def _sync_state(self, group: Any) -> None:
        # NOTE: approximation. A moving average depends on the order of the batches, so no state
        # equals "all ranks' batches in one stream". The ranks' averages are averaged (not their
        # min/max), which matches one stream when the ranks see data from the same distribution.
        world_size = dist.get_world_size(group)
        dist.all_reduce(self.min_val, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.SUM, group=group)
        self.min_val.div_(world_size)
        self.max_val.div_(world_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, averaging_constant={self.averaging_constant}"


def _check_int(value: Any, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name}={value} is below the minimum {minimum}; {hint}")
    return value


def _bin_index(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Return the histogram bin of each value of ``values`` ``(n, m)`` over ``[lo, hi]`` ``(n,)``.

    A block with ``lo == hi`` puts every value into bin 0; values outside the range are clamped.
    """
    width = (hi - lo) / bins
    width = torch.where(width > 0, width, torch.ones_like(width))
    scaled = (values - lo.unsqueeze(-1)).div_(width.unsqueeze(-1))
    return scaled.floor_().clamp_(0, bins - 1).to(torch.int64)


def _flat_offsets(num_blocks: int, bins: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(num_blocks, device=device) * bins).unsqueeze(-1)


def _histogram(
    values: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bins: int,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Count ``values`` ``(n, m)`` into ``bins`` bins per block; return int64 ``(n, bins)``."""
    num_blocks = values.shape[0]
    index = _bin_index(values, lo, hi, bins)
    if num_blocks > 1:
        index += _flat_offsets(num_blocks, bins, index.device)
    if valid is not None:
        index = index[valid]
    counts = torch.bincount(index.reshape(-1), minlength=num_blocks * bins)
    return counts.reshape(num_blocks, bins)


def _rebin(
    histogram: torch.Tensor,
    old_lo: torch.Tensor,
    old_hi: torch.Tensor,
    new_lo: torch.Tensor,
    new_hi: torch.Tensor,
) -> torch.Tensor:
    """Move the counts of ``histogram`` ``(n, bins)`` from ``[old_lo, old_hi]`` to a new range.

    NOTE: approximation. Each old bin's whole count moves to the new bin that contains the old
    bin's center, so a value can land one new bin away from where it would have been counted
    directly. The error in a percentile is up to one bin width per rebinning that moves it.
    """
    num_blocks, bins = histogram.shape
    centers = torch.arange(bins, device=histogram.device, dtype=torch.float32) + 0.5
    centers = old_lo.unsqueeze(-1) + centers * ((old_hi - old_lo) / bins).unsqueeze(-1)
    index = _bin_index(centers, new_lo, new_hi, bins) + _flat_offsets(
        num_blocks, bins, histogram.device
    )
    moved = torch.zeros(num_blocks * bins, dtype=histogram.dtype, device=histogram.device)
    moved.scatter_add_(0, index.reshape(-1), histogram.reshape(-1))
    return moved.reshape(num_blocks, bins)


class PercentileObserver(Observer):
    """Clip each block's range to its lower and upper percentile of all observed values.

    The observer keeps, per block, the running min/max and a histogram of ``bins`` equal bins
    over that range (int64 counts, buffer ``histogram`` of shape ``(*qparams_shape, bins)``).
    The clipping range is the ``100 - percentile`` and ``percentile`` percentiles, interpolated
    linearly inside a bin. Each lies within one bin width ``(max - min) / bins`` of the observed
    values next to its rank. It works for tensors of any size because it never sorts them.

    Use it for activations with rare outliers: at ``percentile=99.99`` the top 0.01 % of values
    are clipped, so they no longer set the scale for all other values. ``percentile=100`` gives
    exactly the min/max range.

    NOTE: the histogram takes ``8 * bins`` bytes per block, so fine per_group specs on large
    weights get expensive (a 4096 x 4096 weight with group_size 128 and 2048 bins needs 2 GiB);
    lower ``bins`` or use :class:`MSEObserver` for weights.

    The resolution is one bin of the whole observed range, so one extreme outlier widens every
    bin. With an outlier 1000 times the typical magnitude, the percentile is only known to about
    ``outlier / bins``. Raise ``bins`` if that is too coarse.

    Args:
        spec: quantization spec.
        percentile: upper percentile in ``[50, 100]``; the lower one is ``100 - percentile``.
        bins: histogram bins per block, at least 16.
    """

    histogram: torch.Tensor
    _data_shaped_buffers = ("min_val", "max_val", "histogram")

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(spec)
        if isinstance(percentile, bool) or not isinstance(percentile, int | float):
            raise TypeError(f"percentile must be a float in [50, 100], got {percentile!r}.")
        # Below 50 the lower percentile would exceed the upper one.
        if not 50.0 <= percentile <= 100.0:
            raise ValueError(
                f"percentile={percentile} is outside [50, 100]. It is the upper percentile, and "
                "the lower one is 100 - percentile. Typical values are 99.9 to 99.999."
            )
        self.percentile = float(percentile)
        self.bins = _check_int(bins, "bins", 16, "use 2048 unless memory is tight.")
        self.register_buffer("histogram", torch.empty(0, dtype=torch.int64))

    def _update(self, x: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        num_blocks = batch_min.numel()
        values = to_blocks(x, self.spec).reshape(num_blocks, -1)
        valid = self._valid_mask(x, values.shape[-1])
        lo, hi = batch_min.reshape(-1), batch_max.reshape(-1)

        if self.observed:
            old_lo = self.min_val.to(x.device).reshape(-1)
            old_hi = self.max_val.to(x.device).reshape(-1)
            histogram = self.histogram.to(x.device).reshape(num_blocks, self.bins)
            lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
            if not (torch.equal(lo, old_lo) and torch.equal(hi, old_hi)):
                histogram = _rebin(histogram, old_lo, old_hi, lo, hi)
        else:
            histogram = torch.zeros(num_blocks, self.bins, dtype=torch.int64, device=x.device)

        histogram = histogram + _histogram(values, lo, hi, self.bins, valid)
        self._store_range(lo.reshape(batch_min.shape), hi.reshape(batch_max.shape))
        self._store("histogram", histogram.reshape(*batch_min.shape, self.bins))

    def _valid_mask(self, x: torch.Tensor, block_size: int) -> torch.Tensor | None:
        """Return a ``(blocks, block_size)`` mask of real elements, or None if nothing is padded.

        per_group pads each row's last group with zeros, and those zeros must not be counted.
        """
        if self.spec.granularity != "per_group":
            return None
        row_length = math.prod(x.shape[1:])
        groups_per_row = math.ceil(row_length / block_size)
        if groups_per_row * block_size == row_length:
            return None
        positions = torch.arange(groups_per_row * block_size, device=x.device)
        row_mask = (positions < row_length).reshape(groups_per_row, block_size)
        return row_mask.expand(x.shape[0], -1, -1).reshape(-1, block_size)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.percentile == 100.0:
            return super()._range()

        shape = self.min_val.shape
        lo = self.min_val.double().reshape(-1, 1)
        hi = self.max_val.double().reshape(-1, 1)
        histogram = self.histogram.reshape(-1, self.bins).double()
        cumulative = histogram.cumsum(dim=-1)
        total = cumulative[:, -1:]

        upper_fraction = self.percentile / 100.0
        lower_position = self._bin_position(histogram, cumulative, total * (1 - upper_fraction))
        upper_position = self._bin_position(histogram, cumulative, total * upper_fraction)

        width = (hi - lo) / self.bins
        lower = torch.clamp(lo + width * lower_position, lo, hi)
        upper = torch.clamp(lo + width * upper_position, lo, hi)
        return lower.float().reshape(shape), upper.float().reshape(shape)

    @staticmethod
    def _bin_position(
        histogram: torch.Tensor, cumulative: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Return where the cumulative count reaches ``target``, in bins from the range start.

        Counts are assumed spread evenly inside a bin, so the position is ``k + fraction`` for
        bin ``k``. The first bin whose cumulative count reaches ``target`` is used, skipping empty
        bins so that the fraction is well defined.
        """
        bins = histogram.shape[-1]
        index = torch.searchsorted(cumulative, target, right=False).clamp_(max=bins - 1)
        # A target of 0 would stop at a leading empty bin; move to the first non-empty one.
        index = torch.where(
            histogram.gather(-1, index) > 0,
            index,
            torch.searchsorted(cumulative, target, right=True).clamp_(max=bins - 1),
        )
        count = histogram.gather(-1, index)
        before = cumulative.gather(-1, index) - count
        fraction = ((target - before) / count.clamp(min=1)).clamp_(0, 1)
        return index + fraction

    def _sync_state(self, group: Any) -> None:
        # Agree on the global range, re-bin each rank's histogram onto it, then add the counts.
        old_lo = self.min_val.reshape(-1).clone()
        old_hi = self.max_val.reshape(-1).clone()
        super()._sync_state(group)
        lo, hi = self.min_val.reshape(-1), self.max_val.reshape(-1)
        histogram = self.histogram.reshape(-1, self.bins)
        if not (torch.equal(lo, old_lo) and torch.equal(hi, old_hi)):
            histogram = _rebin(histogram, old_lo, old_hi, lo, hi)
        histogram = histogram.contiguous()
        dist.all_reduce(histogram, op=dist.ReduceOp.SUM, group=group)
        self._store("histogram", histogram.reshape(self.histogram.shape))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        incoming = state_dict.get(prefix + "histogram")
        if (
            isinstance(incoming, torch.Tensor)
            and incoming.numel()
            and incoming.shape[-1] != (self.bins)
        ):
            error_msgs.append(
                f"histogram in the state_dict has {incoming.shape[-1]} bins but this "
                f"PercentileObserver uses bins={self.bins}; construct it with the same bins."
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}, bins={self.bins}"


def _search_clipping_ratios(
    blocks: torch.Tensor,
    batch_min: torch.Tensor,
    batch_max: torch.Tensor,
    spec: QuantSpec,
    ratios: list[float],
    error_weights: torch.Tensor | None,
) -> torch.Tensor:
    """Return, per block, the ratio of ``ratios`` whose range ``ratio * [min, max]`` has the
    smallest (weighted) sum of squared fake-quantization errors.

    ``blocks`` is the float32 ``(*qparams_shape, block)`` view from ``to_blocks``, and
    ``error_weights``, when given, has the same shape. Ratios are tried in order and a later one
    must be strictly better to win, so the earlier ratio wins a tie.

    The error is computed in units of the scale: with ``t = x / scale`` and
    ``q = clamp(round(t) + zero_point, quant_min, quant_max) - zero_point``, the
    fake-quantization error is ``(q - t) * scale``. The codes equal ``fake_quantize``'s, and
    the error sums differ from it only by float32 rounding. Two scratch tensors are reused for
    every candidate: with torch 2.13 on CPU, an out-of-place op on a fresh 590 k-element tensor
    took about 20 times as long as the same op in place.
    """
    scaled = torch.empty_like(blocks)
    error = torch.empty_like(blocks)
    best_error = torch.full_like(batch_min, math.inf)
    best_ratio = torch.ones_like(batch_min)
    for ratio in ratios:
        scale, zero_point = choose_qparams(ratio * batch_min, ratio * batch_max, spec)
        torch.div(blocks, scale.unsqueeze(-1), out=scaled)
        torch.round(scaled, out=error)
        if spec.symmetric:
            error.clamp_(spec.quant_min, spec.quant_max)
        else:
            shift = zero_point.unsqueeze(-1).float()
            # Shifting to the grid and back is faster than clamping to per-block tensor bounds.
            error.add_(shift).clamp_(spec.quant_min, spec.quant_max).sub_(shift)
        error.sub_(scaled).square_()
        if error_weights is not None:
            error.mul_(error_weights)
        block_error = error.sum(dim=-1).mul_(scale.square())

        better = block_error < best_error
        best_error = torch.where(better, block_error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio


def _check_importance(importance: Any) -> torch.Tensor | None:
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor) or not importance.is_floating_point():
        raise TypeError(
            "importance must be a floating-point tensor that broadcasts to the observed "
            f"tensor, or None; got {type(importance).__name__}."
        )
    importance = importance.detach().float()
    check_finite(importance, "importance")
    if bool((importance < 0).any()):
        raise ValueError(
            f"importance contains negative values (minimum {float(importance.min()):.4g}); "
            "it weights squared errors, so pass non-negative values such as the mean squared "
            "input activation of each input feature."
        )
    return importance


class MSEObserver(Observer):
    """Pick, per block, the clipping range that minimizes the fake-quantization MSE.

    For each observed tensor and each block with range ``[min, max]``, the candidates are
    ``ratio * [min, max]`` for ``ratio`` in ``linspace(min_ratio, 1, num_candidates)``. Each
    candidate's qparams come from ``choose_qparams``, and the candidate with the lowest sum of
    squared ``fake_quantize`` errors over that block wins. On ties the largest ratio wins, so a
    block whose error clipping cannot lower keeps its min/max range. Across several tensors the
    observer keeps the elementwise min/max of the chosen ranges.

    Every block of a tensor is searched at once: per_tensor, per_channel and per_group specs,
    symmetric or affine, cost ``num_candidates`` vectorized passes over the tensor. With the
    defaults and int4 per_group (group_size 32 or 128), the 37 Linear weights of
    all-MiniLM-L6-v2 (10.8 M values) took 0.7 to 1.1 s of CPU time on one thread (torch 2.13,
    a shared 2-core x86 machine).

    Use it for weights at low bit widths (4 bits or fewer), where clipping the tails buys
    resolution for the bulk of the values. For a tensor observed once and no ``importance``,
    the result is the MSE-optimal candidate up to float32 rounding of the error sums. So its
    error is never above :class:`MinMaxObserver`'s (ratio 1) by more than that rounding.

    ``importance`` turns the weight error into an estimate of the output error. For a Linear
    weight ``W`` of shape ``(out, in)`` and inputs ``x``, the output error of row ``i`` is
    ``sum_j (W - W_hat)[i, j] * x[j]``. Dropping the cross terms between input features leaves
    ``sum_j E[x_j ** 2] * (W - W_hat)[i, j] ** 2``. So passing the mean squared input activation
    of each input feature, shape ``(in,)``, clips the weights of rarely active features harder
    and keeps those of large features precise.

    NOTE: ``importance`` comes from calibration data. A feature that was zero in every
    calibration batch does not affect its block's range, so it may be clipped hard if it
    is active later. Calibrate with representative inputs.

    Each observed tensor costs ``num_candidates`` fake-quantization passes over it, so this
    observer suits weights and a few calibration batches, not long activation streams.

    Args:
        spec: quantization spec.
        num_candidates: clipping ratios searched, at least 2 (the grid includes both ends).
        min_ratio: smallest ratio searched, in ``(0, 1]``.
        importance: non-negative weights of each element's squared error, broadcastable to the
            observed tensors' shape (for example ``(in_features,)`` for a Linear weight), or
            ``None`` to weight every element equally.
    """

    def __init__(
        self,
        spec: QuantSpec,
        num_candidates: int = 64,
        min_ratio: float = 0.3,
        importance: torch.Tensor | None = None,
    ) -> None:
        super().__init__(spec)
        self.num_candidates = _check_int(
            num_candidates, "num_candidates", 2, "the search grid needs both min_ratio and 1."
        )
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, int | float):
            raise TypeError(f"min_ratio must be a float in (0, 1], got {min_ratio!r}.")
        if not 0.0 < min_ratio <= 1.0:
            raise ValueError(
                f"min_ratio={min_ratio} is outside (0, 1]; typical values are 0.2 to 0.5."
            )
        self.min_ratio = float(min_ratio)
        self.importance = _check_importance(importance)

    def _update(self, x: torch.Tensor, batch_min: torch.Tensor, batch_max: torch.Tensor) -> None:
        blocks = to_blocks(x, self.spec)
        # Largest ratio first, so a tie keeps the wider range. linspace ends exactly at 1.0,
        # so the first candidate is the plain min/max range.
        ratios = torch.linspace(self.min_ratio, 1.0, self.num_candidates).flip(0).tolist()
        best_ratio = _search_clipping_ratios(
            blocks, batch_min, batch_max, self.spec, ratios, self._error_weights(x)
        )

        chosen_min, chosen_max = best_ratio * batch_min, best_ratio * batch_max
        if self.observed:
            chosen_min = torch.minimum(chosen_min, self.min_val.to(x.device))
            chosen_max = torch.maximum(chosen_max, self.max_val.to(x.device))
        self._store_range(chosen_min, chosen_max)

    def _error_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """Return ``importance`` broadcast to ``x`` in blocked form, or None without one."""
        if self.importance is None:
            return None
        try:
            weights = torch.broadcast_to(self.importance.to(x.device), x.shape)
        except RuntimeError as error:
            raise ValueError(
                f"{self._label()} has importance of shape {tuple(self.importance.shape)}, which "
                f"does not broadcast to the observed tensor of shape {tuple(x.shape)}; pass one "
                "value per element, or a shape that broadcasts such as (in_features,) for a "
                "Linear weight."
            ) from error
        # per_group pads the last group of each row with zeros, whose weight is then 0 as well.
        return to_blocks(weights.contiguous(), self.spec)

    def extra_repr(self) -> str:
        importance = None if self.importance is None else tuple(self.importance.shape)
        return (
            f"{super().extra_repr()}, num_candidates={self.num_candidates}, "
            f"min_ratio={self.min_ratio}, importance_shape={importance}"
        )


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, spec: QuantSpec, **kwargs: Any) -> Observer:
    """Construct the observer registered as ``name`` in :data:`OBSERVERS` for ``spec``."""
    observer_class = OBSERVERS.get(name)
    if observer_class is None:
        raise ValueError(f"unknown observer {name!r}; use one of {', '.join(OBSERVERS)}.")
    return observer_class(spec, **kwargs)
