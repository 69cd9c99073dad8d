"""Shared test set-up."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The digits example lives in examples/ at the repository root, outside the installed package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def nondeterministic_algorithms() -> Iterator[None]:
    """Turn ``torch.use_deterministic_algorithms`` off for one test and restore it after.

    Lightning's ``Trainer(deterministic=True)`` turns it on for the rest of the process, and
    torch then raises on the int8 linear with an 8-bit output.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(previous)
