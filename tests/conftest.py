"""Shared test set-up."""

from __future__ import annotations

import sys
from pathlib import Path

# The digits example lives in examples/ at the repository root, outside the installed package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
