"""The user guide's commands run as written, and their files hold what the guide promises."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import mono_quant as mq
from examples.digits.data import DigitsDataModule
from examples.digits.model import DigitsCNN

from .conftest import REPO_ROOT, GuideRun, guide_blocks, guide_commands

DIGITS_LAYERS = ("net.0", "net.2", "net.6", "net.8")


def _val_images() -> torch.Tensor:
    data = DigitsDataModule()
    data.setup("fit")
    images, _ = next(iter(data.val_dataloader()))
    return images


def test_guide_covers_every_subcommand(guide_run: GuideRun) -> None:
    ran = set(guide_run.outputs)
    for subcommand in ("fit", "quantize", "inspect", "compare", "export", "presets"):
        assert subcommand in ran
    python_blocks = sum(language == "python" for language, _ in guide_blocks())
    assert guide_run.python_blocks == python_blocks


def test_guide_commands_parse_as_lists() -> None:
    commands = [
        argv for lang, code in guide_blocks() if lang == "bash" for argv in guide_commands(code)
    ]
    quantize = next(argv for argv in commands if argv[0] == "quantize")
    assert "--ckpt_path" in quantize
    assert quantize[quantize.index("--bits") + 1] == "4"


def test_fit_writes_checkpoint_and_file(guide_run: GuideRun) -> None:
    run_dir = guide_run.root / "runs" / "digits-w8a8"
    assert (run_dir / "checkpoints" / "digits-cnn.ckpt").is_file()
    assert (run_dir / "quantized-w8a8-static-per-channel.pt").is_file()


def test_quantize_prints_comparison(guide_run: GuideRun) -> None:
    printed = guide_run.outputs["quantize"]
    assert "float vs w4 weight-only, per_group 32" in printed
    assert "accuracy" in printed
    assert "wrote the mono-quant file runs/digits-w8a8/digits-int4.pt" in printed
    assert "wrote the torch.export program" in printed


def test_budget_quantize_prints_its_table(guide_run: GuideRun) -> None:
    printed = guide_run.outputs["quantize --max_metric_drop"]
    assert "metric budget" in printed
    assert "wrote the mono-quant file runs/digits-w8a8/digits-budget.pt" in printed


def test_inspect_lists_every_layer(guide_run: GuideRun) -> None:
    printed = guide_run.outputs["inspect"]
    artifact = mq.io.read_artifact(guide_run.root / "runs/digits-w8a8/digits-int4.pt")
    names = [row["name"] for row in artifact["layers"]]
    assert names == list(DIGITS_LAYERS)
    for name in names:
        assert name in printed
    assert "QuantConv2d" in printed
    assert "QuantLinear" in printed


def test_compare_prints_table(guide_run: GuideRun) -> None:
    printed = guide_run.outputs["compare"]
    assert "output SQNR (dB)" in printed
    assert "top-1 agreement" in printed


def test_artifact_reloads_identically_in_fresh_process(guide_run: GuideRun, tmp_path) -> None:
    artifact = guide_run.root / "runs/digits-w8a8/digits-int4.pt"
    images = _val_images()
    torch.save(images, tmp_path / "images.pt")
    expected = mq.load(artifact, DigitsCNN()).eval()(images)
    code = (
        "import sys, torch, mono_quant as mq\n"
        "from examples.digits.model import DigitsCNN\n"
        "model = mq.load(sys.argv[1], DigitsCNN()).eval()\n"
        "images = torch.load(sys.argv[2], weights_only=True)\n"
        "torch.save(model(images), sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    result = subprocess.run(
        [sys.executable, "-c", code, str(artifact), "images.pt", "output.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "output.pt", weights_only=True), expected)


def test_export_runs_without_mono_quant(guide_run: GuideRun, run_without_mono_quant) -> None:
    images = _val_images()
    run_dir = guide_run.root / "runs" / "digits-w8a8"
    int4 = mq.load(run_dir / "digits-int4.pt", DigitsCNN()).eval()
    w8a8 = mq.load(run_dir / "digits-w8a8.pt", DigitsCNN()).eval()
    programs = ["digits-int4.pt2", "digits-int4-again.pt2", "digits-w8a8.pt2"]

    outputs = run_without_mono_quant([run_dir / name for name in programs], (images,))

    # Exported programs hold the reference path, which eager layers reproduce inside
    # reference_kernels(); their fast kernels round differently.
    with mq.reference_kernels():
        assert torch.equal(outputs[0], int4(images))
        assert torch.equal(outputs[1], int4(images))
        assert torch.equal(outputs[2], w8a8(images))


def test_export_accepts_other_batch_size(guide_run: GuideRun) -> None:
    images = _val_images()[:5]
    run_dir = guide_run.root / "runs" / "digits-w8a8"
    quantized = mq.load(run_dir / "digits-int4.pt", DigitsCNN()).eval()

    program = torch.export.load(run_dir / "digits-int4.pt2").module()

    with mq.reference_kernels():
        assert torch.equal(program(images), quantized(images))
