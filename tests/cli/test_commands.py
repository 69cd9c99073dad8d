"""mono-quant quantize, compare, export, inspect and presets on a small model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mono_quant as mq
from mono_quant.cli import main
from mono_quant.io import read_artifact

from .tiny import DATA, MODEL, TinyData, TinyNet, write_checkpoint, write_state_dict


@pytest.fixture(autouse=True)
def wide_output(monkeypatch) -> None:
    """Print tables 200 columns wide, so that no cell the tests look for is folded."""
    monkeypatch.setenv("COLUMNS", "200")


def test_quantize_uses_checkpoint_hyperparameters(tmp_path, capsys) -> None:
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", hidden=12)
    output = tmp_path / "tiny.pt"

    main(
        [
            "quantize",
            "--model",
            MODEL,
            "--ckpt_path",
            str(ckpt),
            "--data",
            DATA,
            "--bits",
            "4",
            "--group_size",
            "8",
            "--output",
            str(output),
        ]
    )

    artifact = read_artifact(output)
    assert artifact["metadata"]["model"]["init_args"]["hidden"] == 12
    assert artifact["state_dict"]["net.0._extra_state"]["weight_shape"] == [12, 16]
    assert artifact["config"]["group_size"] == 8
    assert f"wrote the mono-quant file {output}" in capsys.readouterr().out


def test_quantize_state_dict_matches_library(tmp_path, capsys) -> None:
    model, state = write_state_dict(tmp_path / "tiny.pth")
    output = tmp_path / "tiny.pt"

    main(
        [
            "quantize",
            "--model",
            MODEL,
            "--state_dict",
            str(state),
            "--data",
            DATA,
            "--calibration_batches",
            "3",
            "--output",
            str(output),
        ]
    )

    data = TinyData()
    data.setup()
    expected = mq.quantize(model.eval(), "w8a8", data.train_dataloader(), calibration_batches=3)
    loaded = mq.load(output, TinyNet()).eval()
    x = data.x[48:]
    assert torch.equal(loaded(x), expected(x))
    captured = capsys.readouterr()
    assert "float vs w8a8 static, per_channel" in captured.out
    assert "top-1 agreement" in captured.out
    assert "calibrating" in captured.err
    assert "3/3" in captured.err
    assert "evaluating" in captured.err


def test_quantize_with_metrics_and_config_file(tmp_path, capsys) -> None:
    _, state = write_state_dict(tmp_path / "tiny.pth")
    config = tmp_path / "quantize.yaml"
    config.write_text(
        f"model: {MODEL}\n"
        f"state_dict: {state}\n"
        f"data: {DATA}\n"
        "bits: 8\n"
        "activations: dynamic\n"
        "metrics:\n"
        "  class_path: torchmetrics.classification.MulticlassAccuracy\n"
        "  init_args:\n"
        "    num_classes: 4\n"
        f"output: {tmp_path / 'tiny.pt'}\n"
    )

    main(["quantize", "--config", str(config)])

    printed = capsys.readouterr().out
    assert "multiclass_accuracy" in printed
    assert "float vs w8a8 dynamic, per_channel" in printed
    assert read_artifact(tmp_path / "tiny.pt")["config"]["activations"] == "dynamic"


def test_quantize_print_config(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "quantize",
                "--model",
                MODEL,
                "--data",
                DATA,
                "--bits",
                "4",
                "--output",
                "x.pt",
                "--print_config",
            ]
        )

    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "bits: 4" in printed
    assert f"class_path: {MODEL}" in printed
    assert not (tmp_path / "x.pt").exists()


QUANTIZE_OPTIONS = [
    "--config",
    "--print_config",
    "--model",
    "--ckpt_path",
    "--state_dict",
    "--data",
    "--eval_split",
    "--bits",
    "--activations",
    "--granularity",
    "--group_size",
    "--symmetric",
    "--observer",
    "--weight_observer",
    "--dtype",
    "--include",
    "--exclude",
    "--calibration_batches",
    "--metrics",
    "--eval_batches",
    "--max_metric_drop",
    "--monitor",
    "--seed",
    "--output",
    "--export",
    "--dynamic_batch",
]


@pytest.mark.parametrize(
    ("subcommand", "options"),
    [
        ("quantize", QUANTIZE_OPTIONS),
        (
            "compare",
            [
                "--model",
                "--ckpt_path",
                "--state_dict",
                "--artifact",
                "--data",
                "--eval_split",
                "--metrics",
                "--eval_batches",
                "--config",
            ],
        ),
        (
            "export",
            [
                "--model",
                "--ckpt_path",
                "--artifact",
                "--data",
                "--eval_split",
                "--output",
                "--dynamic_batch",
                "--config",
            ],
        ),
        ("inspect", ["path"]),
    ],
    ids=["quantize", "compare", "export", "inspect"],
)
def test_help_documents_every_option(subcommand: str, options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])

    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    for option in options:
        assert option in printed, option


def test_top_level_help_lists_subcommands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])

    printed = capsys.readouterr().out
    for subcommand in ("quantize", "compare", "inspect", "export", "presets", "fit", "test"):
        assert subcommand in printed, subcommand


@pytest.fixture
def tiny_artifact(tmp_path) -> tuple[Path, Path]:
    """Quantize TinyNet to w4 through the command; return the state_dict and artifact paths."""
    _, state = write_state_dict(tmp_path / "tiny.pth")
    artifact = tmp_path / "tiny.pt"
    main(
        [
            "quantize",
            "--model",
            MODEL,
            "--state_dict",
            str(state),
            "--data",
            DATA,
            "--bits",
            "4",
            "--group_size",
            "8",
            "--output",
            str(artifact),
        ]
    )
    return state, artifact


def test_compare_prints_table(tiny_artifact, capsys) -> None:
    state, artifact = tiny_artifact
    capsys.readouterr()

    main(
        [
            "compare",
            "--model",
            MODEL,
            "--state_dict",
            str(state),
            "--artifact",
            str(artifact),
            "--data",
            DATA,
            "--eval_batches",
            "1",
        ]
    )

    captured = capsys.readouterr()
    assert "float vs tiny.pt" in captured.out
    assert "8 samples in 1 batch" in captured.out
    assert "1/1" in captured.err


def test_export_writes_program(tiny_artifact, tmp_path, capsys) -> None:
    _, artifact = tiny_artifact
    program = tmp_path / "tiny.pt2"

    main(
        [
            "export",
            "--model",
            MODEL,
            "--artifact",
            str(artifact),
            "--data",
            DATA,
            "--output",
            str(program),
            "--dynamic_batch",
            "false",
        ]
    )

    x = torch.randn(8, 16)
    expected = mq.load(artifact, TinyNet()).eval()(x)
    assert torch.equal(torch.export.load(program).module()(x), expected)
    assert "the example batch size only" in capsys.readouterr().out


def test_inspect_lists_layers_and_reasons(tiny_artifact, capsys) -> None:
    _, artifact = tiny_artifact
    capsys.readouterr()

    main(["inspect", str(artifact)])

    printed = capsys.readouterr().out
    assert "w4 weight-only, per_group 8; 2 of 3 layers quantized" in printed
    assert f"model: {MODEL}" in printed
    for name in ("net.0", "net.2", "norm"):
        assert name in printed, name
    assert "QuantLinear" in printed
    assert "per_group 8" in printed
    assert "skipped: normalization layers stay in float" in printed


def test_presets_lists_every_preset(capsys) -> None:
    main(["presets"])

    printed = capsys.readouterr().out
    for name in mq.PRESETS:
        assert name in printed, name


def test_quantize_with_metric_budget(tmp_path, capsys) -> None:
    _, state = write_state_dict(tmp_path / "tiny.pth")
    output = tmp_path / "tiny.pt"

    main(
        [
            "quantize",
            "--model",
            MODEL,
            "--state_dict",
            str(state),
            "--data",
            DATA,
            "--bits",
            "2",
            "--granularity",
            "per_tensor",
            "--max_metric_drop",
            "0",
            "--monitor",
            "acc",
            "--output",
            str(output),
        ]
    )

    printed = capsys.readouterr().out
    assert "metric budget met: accuracy drop" in printed
    overrides = read_artifact(output)["config"]["overrides"]
    loaded = mq.load(output, TinyNet())
    rows = {row.name: row for row in mq.quantization_report(loaded).layers}
    for name, changes in (overrides or {}).items():
        assert rows[name].quantized == (changes is not None)


def test_monitor_without_budget_is_an_error(tmp_path, capsys) -> None:
    _, state = write_state_dict(tmp_path / "tiny.pth")

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "quantize",
                "--model",
                MODEL,
                "--state_dict",
                str(state),
                "--data",
                DATA,
                "--monitor",
                "acc",
                "--output",
                str(tmp_path / "tiny.pt"),
            ]
        )

    assert exit_info.value.code == 2
    assert "--monitor acc only applies to a metric budget" in capsys.readouterr().err
