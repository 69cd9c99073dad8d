"""Compute error figures between a reference output and a test output, such as SQNR."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Compute the signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB.

    The formula is ``10 * log10(sum(reference**2) / sum((reference - test)**2))``, evaluated in
    float64. Higher is better: each halving of the error RMS adds about 6.02 dB.

    Returns:
        ``math.inf`` when the error is exactly zero, ``-math.inf`` when the reference is all
        zeros but the error is not, and ``math.nan`` when either tensor contains NaN.

    Raises:
        TypeError: when either argument is not a tensor, or is complex.
        ValueError: when the shapes differ.
    """
    _check_real_tensor(reference, "reference")
    _check_real_tensor(test, "test")
    if reference.shape != test.shape:
        raise ValueError(
            f"sqnr_db() needs tensors of the same shape, but reference has shape "
            f"{tuple(reference.shape)} and test has shape {tuple(test.shape)}. Compare "
            "outputs of the same batch."
        )

    signal_power, noise_power = _signal_and_noise_power(reference, test)
    return sqnr_db_from_power(signal_power, noise_power)


def sqnr_db_from_power(signal_power: float, noise_power: float) -> float:
    """Return ``10 * log10(signal_power / noise_power)`` with the edge cases of ``sqnr_db``.

    Both powers are sums of squares, so several batches can be combined by adding their sums
    before calling this once.
    """
    if math.isnan(signal_power) or math.isnan(noise_power):
        return math.nan
    if noise_power == 0.0:
        return math.inf
    if signal_power == 0.0:
        return -math.inf
    if math.isinf(signal_power) and math.isinf(noise_power):
        return math.nan

    # Dividing first keeps an infinite power from reaching log10 as inf/inf.
    ratio = signal_power / noise_power
    if ratio == 0.0:
        return -math.inf
    if math.isinf(ratio):
        return math.inf
    return 10.0 * math.log10(ratio)


def top1_agreement(reference: Tensor, test: Tensor) -> float:
    """Return the fraction of rows of two ``(N, C)`` outputs whose argmax over ``C`` is equal.

    Raises:
        ValueError: when the outputs are not 2-D, have different shapes or have no rows.
    """
    matches, rows = top1_matches(reference, test)
    if rows == 0:
        raise ValueError(
            "top1_agreement() received outputs with zero rows. Pass a non-empty batch."
        )
    return matches / rows


def top1_matches(reference: Tensor, test: Tensor) -> tuple[int, int]:
    """Count the rows of two ``(N, C)`` outputs whose argmax over ``C`` is equal.

    Returns:
        ``(matching_rows, N)``, so counts from several batches can be added up.

    Raises:
        ValueError: when the outputs are not 2-D or have different shapes.
    """
    if reference.ndim != 2 or reference.shape != test.shape:
        raise ValueError(
            "top1_matches() needs two (N, C) outputs of the same shape, but received shapes "
            f"{tuple(reference.shape)} and {tuple(test.shape)}."
        )
    test = test.to(reference.device)
    matches = (reference.argmax(dim=1) == test.argmax(dim=1)).sum().item()
    return int(matches), reference.shape[0]


class OutputErrorStats:
    """Running error figures between reference and test outputs over several batches.

    SQNR adds up the sums of squares of all batches before taking one ratio, so it equals the
    SQNR of all outputs concatenated, not the mean of per-batch SQNRs. Top-1 agreement is
    tracked only while every batch is classification-shaped, meaning 2-D ``(N, C)`` with
    ``C >= 2``.
    """

    def __init__(self) -> None:
        self.signal_power = 0.0
        self.noise_power = 0.0
        self.max_abs_error = 0.0
        self.num_samples = 0
        self.num_batches = 0
        self.nonfinite_reference = 0
        self.nonfinite_test = 0
        self._top1_matches = 0
        self._top1_rows = 0
        self._all_classification = True

    def update(self, reference: Tensor, test: Tensor) -> None:
        """Add one batch of outputs of equal shape, moving ``test`` to ``reference``'s device."""
        _check_real_tensor(reference, "reference")
        _check_real_tensor(test, "test")
        if reference.shape != test.shape:
            raise ValueError(
                f"The outputs of one batch differ in shape: reference {tuple(reference.shape)}, "
                f"test {tuple(test.shape)}. Both models must return outputs of the same shape."
            )
        test = test.to(reference.device)

        signal_power, noise_power = _signal_and_noise_power(reference, test)
        self.signal_power += signal_power
        self.noise_power += noise_power
        self._update_max_abs_error(reference, test)
        self.nonfinite_reference += int((~torch.isfinite(reference)).sum().item())
        self.nonfinite_test += int((~torch.isfinite(test)).sum().item())

        if is_classification_output(reference):
            matches, rows = top1_matches(reference, test)
            self._top1_matches += matches
            self._top1_rows += rows
        else:
            self._all_classification = False

        # A 0-d output (one scalar per batch) counts as one sample.
        self.num_samples += reference.shape[0] if reference.ndim > 0 else 1
        self.num_batches += 1

    @property
    def sqnr_db(self) -> float:
        """SQNR in dB over every batch seen so far."""
        return sqnr_db_from_power(self.signal_power, self.noise_power)

    @property
    def top1_agreement(self) -> float | None:
        """Fraction of rows with equal argmax, or ``None`` for non-class outputs."""
        if not self._all_classification or self._top1_rows == 0:
            return None
        return self._top1_matches / self._top1_rows

    def _update_max_abs_error(self, reference: Tensor, test: Tensor) -> None:
        if reference.numel() == 0 or math.isnan(self.max_abs_error):
            return
        batch_max = (reference.to(torch.float64) - test.to(torch.float64)).abs().max().item()
        # torch.max propagates NaN but Python's max() depends on argument order, so keep NaN sticky.
        if math.isnan(batch_max):
            self.max_abs_error = math.nan
        else:
            self.max_abs_error = max(self.max_abs_error, batch_max)


def is_classification_output(output: Tensor) -> bool:
    """Return whether ``output`` is shaped like class scores: 2-D ``(N, C)`` with ``C >= 2``."""
    return output.ndim == 2 and output.shape[1] >= 2


def _signal_and_noise_power(reference: Tensor, test: Tensor) -> tuple[float, float]:
    reference64 = reference.detach().to(torch.float64)
    test64 = test.detach().to(device=reference.device, dtype=torch.float64)
    signal_power = reference64.square().sum().item()
    noise_power = (reference64 - test64).square().sum().item()
    return signal_power, noise_power


def _check_real_tensor(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"Expected {name} to be a torch.Tensor, but received {type(value).__name__}."
        )
    if value.is_complex():
        raise TypeError(
            f"Expected {name} to be a real tensor, but received dtype {value.dtype}. Pass the "
            "real and imaginary parts as separate real tensors, e.g. torch.view_as_real()."
        )
