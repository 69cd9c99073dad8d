"""QuantizeCallback under DDP on 2 CPU processes (gloo): every rank ends with the same ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mono_quant.core.qparams import choose_qparams
from mono_quant.nn.activation import STATIC_SPEC

SCRIPT = Path(__file__).with_name("ddp_run.py")
SOURCE = Path(__file__).resolve().parents[2] / "src"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


# One spawned worker aborted at interpreter exit, after its work had finished ("terminate called
# without an active exception"); that was seen once in about ten runs of this file.
# NOTE: the cause is not found yet. A run that aborts that way is retried once. Any other
# failure, or the same abort twice, fails the test.
_EXIT_ABORT = "terminate called without an active exception"


def _run(strategy: str, mode: str, out_dir: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, str(SCRIPT), strategy, mode, str(out_dir)]
    for attempt in range(2):
        result = subprocess.run(
            command, env=env, cwd=out_dir, capture_output=True, text=True, timeout=300
        )
        if result.returncode == 0 or _EXIT_ABORT not in result.stderr or attempt == 1:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _union_qparams() -> tuple[float, int]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_run import dataset
    finally:
        sys.path.remove(str(SCRIPT.parent))
    inputs = dataset().tensors[0]
    scale, zero_point = choose_qparams(inputs.min(), inputs.max(), STATIC_SPEC)
    return float(scale), int(zero_point)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_ranks_share_union_ranges(strategy: str, mode: str, tmp_path: Path) -> None:
    rank0, rank1 = _run(strategy, mode, tmp_path)
    expected_scale, expected_zero_point = _union_qparams()

    for key in rank0:
        if key != "rank":
            assert rank0[key] == rank1[key], f"{key} differs between ranks"
    # Minmax over both ranks' halves equals one process observing the whole dataset.
    assert rank0["input_scale"] == pytest.approx(expected_scale, rel=1e-6)
    assert rank0["input_zero_point"] == expected_zero_point
    assert len(list(tmp_path.glob("quantized-*.pt"))) == 1
