"""Every YAML file in configs/ builds a run with a QuantizeCallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.digits.cli import main
from mono_quant.lightning import QuantizeCallback

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _quantize_callbacks(cli) -> list[QuantizeCallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, QuantizeCallback)]


def test_configs_folder_is_not_empty() -> None:
    assert CONFIGS, "configs/ has no YAML files"


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_builds_callback(config: Path, tmp_path: Path) -> None:
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)

    callbacks = _quantize_callbacks(cli)
    assert len(callbacks) == 1
    assert callbacks[0].config.bits in (4, 8)


def test_w8a8_config_values() -> None:
    config = next(path for path in CONFIGS if path.stem == "digits-w8a8")

    callback = _quantize_callbacks(main(["--config", str(config)], run=False))[0]

    assert callback.config.label == "w8a8 static, per_channel"
    assert callback.calibration_batches == 16
    assert type(callback.metrics).__name__ == "MulticlassAccuracy"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("--trainer.callbacks.init_args.granularity=per-channel", "granularity"),
        ("--trainer.callbacks.init_args.group_size=-4", "group_size"),
        ("--trainer.callbacks.init_args.bits=9", "bits"),
    ],
    ids=["misspelled-granularity", "negative-group-size", "bits-9"],
)
def test_invalid_value_fails_at_parse_time(override: str, field: str, capsys) -> None:
    config = next(path for path in CONFIGS if path.stem == "digits-int4")

    with pytest.raises(SystemExit):
        main(["--config", str(config), override], run=False)

    assert field in capsys.readouterr().err
