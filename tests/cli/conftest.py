"""Fixtures for the mono-quant command tests: one run of the user guide, shared by the tests."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mono_quant.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
USER_GUIDE = REPO_ROOT / "docs" / "user-guide.md"
RUNNER = Path(__file__).resolve().parent / "run_exported.py"
FENCED_BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.DOTALL)
# The guide trains for 10 epochs; the tests train 1 epoch of 8 batches and calibrate on 4
# batches to stay fast. QuantizeCallback is the last callback in every config, which is the one
# that --trainer.callbacks.init_args changes.
FAST_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=8",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.callbacks.init_args.calibration_batches=4",
]
FAST_TRAINER = "max_epochs=1, limit_train_batches=8, limit_val_batches=2"


@dataclass
class GuideRun:
    """Outputs of every command of the user guide, run in order in ``root``."""

    root: Path
    outputs: dict[str, str] = field(default_factory=dict)
    python_blocks: int = 0


def guide_blocks() -> list[tuple[str, str]]:
    """Return the (language, code) of every bash and python block of the user guide."""
    return FENCED_BLOCK.findall(USER_GUIDE.read_text())


def guide_commands(code: str) -> list[list[str]]:
    """Return the argument lists of the ``mono-quant`` lines of a bash block."""
    joined = code.replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("mono-quant ")]


def run_command(argv: list[str]) -> str:
    """Run ``mono-quant argv`` in this process and return what it printed on stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def guide_run(tmp_path_factory: pytest.TempPathFactory) -> GuideRun:
    """Run every command and code block of docs/user-guide.md, in order, in a fresh folder."""
    root = tmp_path_factory.mktemp("guide")
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    run = GuideRun(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for language, code in guide_blocks():
            if language == "python":
                exec(compile(code.replace("max_epochs=10", FAST_TRAINER), "guide", "exec"), {})
                run.python_blocks += 1
                continue
            for argv in guide_commands(code):
                extra = FAST_FIT if argv[0] == "fit" else []
                output = run_command(argv + extra)
                # The guide runs quantize twice; the metric-budget run gets its own key.
                budget = " --max_metric_drop" if "--max_metric_drop" in argv else ""
                run.outputs[argv[0] + budget] = output
    return run


@pytest.fixture
def run_without_mono_quant(
    tmp_path: Path,
) -> Callable[[list[Path], tuple[torch.Tensor, ...]], list[object]]:
    """Return a function that runs exported programs where mono_quant cannot be imported.

    The function takes the program paths and one tuple of inputs, and returns the list of
    outputs, one per program.
    """

    def run(programs: list[Path], inputs: tuple[torch.Tensor, ...]) -> list[object]:
        torch.save(inputs, tmp_path / "inputs.pt")
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        result = subprocess.run(
            [sys.executable, "-I", str(RUNNER), "inputs.pt", "output.pt", *map(str, programs)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return torch.load(tmp_path / "output.pt", weights_only=True)

    return run
