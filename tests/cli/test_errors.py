"""Every user mistake ends mono-quant with exit status 2 and a message that names the problem."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.cli import main

from .tiny import (
    DATA,
    MODEL,
    VALIDATION_ONLY_DATA,
    TinyNet,
    write_checkpoint,
    write_state_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
INT4_CONFIG = str(REPO_ROOT / "configs" / "digits-int4.yaml")


class MakeMarker:
    """Pickle payload: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _fail(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def _assert_one_line(error: str, message: str) -> None:
    lines = error.strip().splitlines()
    assert lines[-1].startswith("mono-quant: error: ")
    assert message in lines[-1]
    assert "Traceback" not in error


class Files:
    """Weight files and artifacts written on demand in one test's folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "payload-ran"

    def checkpoint(self) -> str:
        return str(write_checkpoint(self.root / "tiny.ckpt", hidden=12))

    def state_dict(self, hidden: int = 8) -> str:
        return str(write_state_dict(self.root / f"tiny-{hidden}.pth", hidden)[1])

    def artifact(self, preset: str = "w4") -> str:
        path = self.root / f"tiny-{preset}.pt"
        mq.save(mq.quantize(TinyNet(), preset), path)
        return str(path)

    def quantized_state_dict(self) -> str:
        path = self.root / "quantized.pth"
        torch.save(mq.quantize(TinyNet(), "w8").state_dict(), path)
        return str(path)

    def qat_checkpoint(self) -> str:
        path = self.root / "qat.ckpt"
        state = TinyNet().state_dict()
        torch.save({"state_dict": state, "mono_quant": {"mode": "qat", "config": {}}}, path)
        return str(path)

    def payload(self, name: str) -> str:
        path = self.root / name
        torch.save({"state_dict": {}, "format": "mono-quant", "x": MakeMarker(self.marker)}, path)
        return str(path)

    def garbage(self) -> str:
        path = self.root / "garbage.ckpt"
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return str(path)

    def linear_state_dict(self) -> str:
        path = self.root / "linear.pth"
        torch.save(nn.Linear(3, 4).state_dict(), path)
        return str(path)


def _quantize(*extra: str) -> list[str]:
    return ["quantize", "--model", MODEL, "--data", DATA, "--output", "out.pt", *extra]


# Each case: argv built from the test's Files, and the text the last stderr line must contain.
RUNTIME_ERRORS: dict[str, tuple[Callable[[Files], list[str]], str]] = {
    "bits-dtype-conflict": (
        lambda f: _quantize("--state_dict", f.state_dict(), "--bits", "4", "--dtype", "float16"),
        "dtype='float16' stores 16-bit weights; set bits=16.",
    ),
    "no-weights": (lambda f: _quantize(), "no float weights given; pass --ckpt_path"),
    "two-weight-files": (
        lambda f: _quantize("--state_dict", f.state_dict(), "--ckpt_path", f.checkpoint()),
        "pass either --ckpt_path or --state_dict, not both.",
    ),
    "missing-checkpoint": (
        lambda f: _quantize("--ckpt_path", str(f.root / "missing.ckpt")),
        "no Lightning checkpoint at",
    ),
    "garbage-checkpoint": (
        lambda f: _quantize("--ckpt_path", f.garbage()),
        "is not a readable Lightning checkpoint",
    ),
    "artifact-as-checkpoint": (
        lambda f: _quantize("--ckpt_path", f.artifact()),
        "is a quantized mono-quant file, not a float checkpoint; load it with mono_quant.load",
    ),
    "state-dict-as-checkpoint": (
        lambda f: _quantize("--ckpt_path", f.state_dict()),
        "has no 'state_dict' entry. For a file written with torch.save(model.state_dict())",
    ),
    "qat-checkpoint": (
        lambda f: _quantize("--ckpt_path", f.qat_checkpoint()),
        "mono_quant.lightning.qat.load_qat_checkpoint",
    ),
    "artifact-as-state-dict": (
        lambda f: _quantize("--state_dict", f.artifact()),
        "is a quantized mono-quant file, not a float state_dict; load it with mono_quant.load",
    ),
    "checkpoint-as-state-dict": (
        lambda f: _quantize("--state_dict", f.checkpoint()),
        "is a Lightning checkpoint; pass it as --ckpt_path instead.",
    ),
    "quantized-state-dict": (
        lambda f: _quantize("--state_dict", f.quantized_state_dict()),
        "contains quantized layers ['net.0', 'net.2'], which a float model cannot load",
    ),
    "state-dict-shape-mismatch": (
        lambda f: _quantize("--state_dict", f.state_dict(hidden=12)),
        "does not fit TinyNet (Error(s) in loading state_dict for TinyNet: size mismatch",
    ),
    "state-dict-other-model": (
        lambda f: _quantize("--state_dict", f.linear_state_dict()),
        "does not match TinyNet: missing keys ['net.0.bias', 'net.0.weight'",
    ),
    "explicit-init-args-win": (
        lambda f: _quantize("--ckpt_path", f.checkpoint(), "--model.init_args.hidden", "8"),
        "does not fit TinyNet",
    ),
    "output-is-directory": (
        lambda f: [*_quantize("--state_dict", f.state_dict())[:-2], "--output", str(f.root)],
        "is a directory; pass a file name",
    ),
    "data-does-not-fit-model": (
        lambda f: [
            "quantize",
            "--model",
            "torch.nn.Linear",
            "--model.in_features",
            "3",
            "--model.out_features",
            "4",
            "--state_dict",
            f.linear_state_dict(),
            "--data",
            DATA,
            "--output",
            "out.pt",
        ],
        "calibration batch 0 failed in ObservedLayer.forward: mat1 and mat2 shapes cannot be",
    ),
    "no-train-dataloader": (
        lambda f: [
            "quantize",
            "--model",
            MODEL,
            "--state_dict",
            f.state_dict(),
            "--data",
            VALIDATION_ONLY_DATA,
            "--output",
            "out.pt",
        ],
        "ValidationOnlyData has no train_dataloader, which static activations need",
    ),
    "data-module-value": (
        lambda f: _quantize("--state_dict", f.state_dict(), "--data.batch_size", "0"),
        "batch_size should be a positive integer value",
    ),
    "compare-missing-artifact": (
        lambda f: [
            "compare",
            "--model",
            MODEL,
            "--state_dict",
            f.state_dict(),
            "--artifact",
            str(f.root / "missing.pt"),
            "--data",
            DATA,
        ],
        "no mono-quant file at",
    ),
    "compare-other-architecture": (
        lambda f: [
            "compare",
            "--model",
            MODEL,
            "--ckpt_path",
            f.checkpoint(),
            "--artifact",
            f.artifact(),
            "--data",
            DATA,
        ],
        "layer 'net.0' has weight 'weight' of shape [12, 16] but the file stores [8, 16]",
    ),
    "compare-state-dict-as-artifact": (
        lambda f: [
            "compare",
            "--model",
            MODEL,
            "--state_dict",
            f.state_dict(),
            "--artifact",
            f.state_dict(),
            "--data",
            DATA,
        ],
        "is not a mono-quant file: it has no 'mono-quant' header",
    ),
    "export-dynamic-activations": (
        lambda f: [
            "export",
            "--model",
            MODEL,
            "--artifact",
            f.artifact("w8a8-dynamic"),
            "--data",
            DATA,
            "--output",
            "out.pt2",
        ],
        "use dynamic activations, whose qparams are computed with a data-dependent check",
    ),
    "export-output-is-directory": (
        lambda f: [
            "export",
            "--model",
            MODEL,
            "--artifact",
            f.artifact(),
            "--data",
            DATA,
            "--output",
            str(f.root),
        ],
        "--output",
    ),
    "inspect-missing": (lambda f: ["inspect", str(f.root / "missing.pt")], "no mono-quant file"),
    "inspect-garbage": (lambda f: ["inspect", f.garbage()], "is not a readable mono-quant file"),
    "inspect-directory": (lambda f: ["inspect", str(f.root)], "is a directory"),
    "inspect-state-dict": (
        lambda f: ["inspect", f.state_dict()],
        "A plain state_dict or Lightning checkpoint must be quantized first",
    ),
    "fit-bits-dtype-conflict": (
        lambda f: [
            "fit",
            "--config",
            INT4_CONFIG,
            "--trainer.callbacks.init_args.dtype=float16",
        ],
        "dtype='float16' stores 16-bit weights; set bits=16.",
    ),
}


@pytest.mark.parametrize("case", list(RUNTIME_ERRORS), ids=list(RUNTIME_ERRORS))
def test_runtime_error_is_one_line(case: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    build_argv, message = RUNTIME_ERRORS[case]
    argv = build_argv(Files(tmp_path))
    capsys.readouterr()

    code, error = _fail(argv, capsys)

    assert code == 2
    _assert_one_line(error, message)


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{payload}"],
        ["quantize", "--model", MODEL, "--ckpt_path", "{payload}", "--data", DATA, "--output", "o"],
        [
            "quantize",
            "--model",
            MODEL,
            "--state_dict",
            "{payload}",
            "--data",
            DATA,
            "--output",
            "o",
        ],
        ["export", "--model", MODEL, "--artifact", "{payload}", "--data", DATA, "--output", "o"],
    ],
    ids=["inspect", "checkpoint", "state-dict", "export"],
)
def test_pickle_payload_never_runs(argv: list[str], tmp_path, capsys) -> None:
    files = Files(tmp_path)
    payload = files.payload("model.pt")

    code, error = _fail([payload if arg == "{payload}" else arg for arg in argv], capsys)

    assert code == 2
    _assert_one_line(error, "contains a pickled Python object")
    assert not files.marker.exists()


# Values that jsonargparse rejects while parsing; its message names the option.
PARSE_ERRORS = {
    "missing-output": (["quantize", "--model", MODEL, "--data", DATA], "output"),
    "unknown-model-class": (
        ["quantize", "--model", "nowhere.Net", "--data", DATA, "--output", "o"],
        "nowhere.Net",
    ),
    "bits-9": (_quantize("--bits", "9"), "bits"),
    "misspelled-granularity": (_quantize("--granularity", "per-channel"), "granularity"),
    "negative-group-size": (_quantize("--group_size", "-4"), "group_size"),
    "unknown-observer": (_quantize("--observer", "minmaxx"), "observer"),
    "unknown-option": (_quantize("--bitz", "4"), "--bitz"),
    "unknown-subcommand": (["quantise"], "quantise"),
    "missing-config-file": (["quantize", "--config", "missing.yaml"], "missing.yaml"),
    "fit-misspelled-granularity": (
        ["fit", "--config", INT4_CONFIG, "--trainer.callbacks.init_args.granularity=per-group"],
        "granularity",
    ),
    "fit-negative-group-size": (
        ["fit", "--config", INT4_CONFIG, "--trainer.callbacks.init_args.group_size=-4"],
        "group_size",
    ),
    "fit-unknown-model-class": (
        ["fit", "--config", INT4_CONFIG, "--model", "nowhere.Net"],
        "nowhere.Net",
    ),
    "fit-missing-config-file": (["fit", "--config", "missing.yaml"], "missing.yaml"),
}


@pytest.mark.parametrize("case", list(PARSE_ERRORS), ids=list(PARSE_ERRORS))
def test_parse_error_names_option(case: str, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv, name = PARSE_ERRORS[case]

    code, error = _fail(argv, capsys)

    assert code == 2
    assert "error:" in error
    assert name in error
    assert "Traceback" not in error


def test_traceback_variable_reraises(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MONO_QUANT_TRACEBACK", "1")

    with pytest.raises(FileNotFoundError, match="no mono-quant file at"):
        main(["inspect", str(tmp_path / "missing.pt")])
