"""Every YAML file in configs/ builds a LightningCLI run with a QuantizeCallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.digits.cli import main
from mono_quant.cli.lightning_cli import ConfigError
from mono_quant.lightning import QuantizeCallback

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _config(stem: str) -> Path:
    return next(path for path in CONFIGS if path.stem == stem)


def _quantize_callback(cli) -> QuantizeCallback:
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, QuantizeCallback)]
    assert len(callbacks) == 1
    return callbacks[0]


def test_configs_cover_every_scheme() -> None:
    stems = {path.stem for path in CONFIGS}

    for stem in ("digits-w8a8", "digits-int4", "digits-dynamic-int8", "digits-qat-int4"):
        assert stem in stems, stem


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=[path.stem for path in CONFIGS],
)
def test_config_builds_callback(config: Path, tmp_path: Path) -> None:
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)

    callback = _quantize_callback(cli)
    assert callback.config.bits in (4, 8)
    assert callback.save_dir == f"runs/{config.stem}"
    assert type(cli.model).__name__ == "DigitsCNN"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    assert cli.trainer.checkpoint_callback.dirpath.endswith(f"runs/{config.stem}/checkpoints")


@pytest.mark.parametrize(
    ("stem", "label"),
    [
        ("digits-w8a8", "w8a8 static, per_channel"),
        ("digits-int4", "w4 weight-only, per_group 32"),
        ("digits-dynamic-int8", "w8a8 dynamic, per_channel"),
        ("digits-qat-int4", "w4 weight-only, per_group 32"),
    ],
    ids=["w8a8", "int4", "dynamic-int8", "qat-int4"],
)
def test_config_label(stem: str, label: str) -> None:
    callback = _quantize_callback(main(["--config", str(_config(stem))], run=False))

    assert callback.config.label == label


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=[path.stem for path in CONFIGS],
)
def test_callback_state_loads_weights_only(config: Path, tmp_path: Path) -> None:
    callback = _quantize_callback(main(["--config", str(config)], run=False))
    torch.save({"callbacks": {callback.state_key: callback.state_dict()}}, tmp_path / "a.ckpt")

    state = torch.load(tmp_path / "a.ckpt", weights_only=True)

    assert state["callbacks"][callback.state_key]["config"] == callback.config.to_dict()


def test_w8a8_config_values() -> None:
    callback = _quantize_callback(main(["--config", str(_config("digits-w8a8"))], run=False))

    assert callback.calibration_batches == 16
    assert type(callback.metrics).__name__ == "MulticlassAccuracy"


def test_qat_config_mode() -> None:
    callback = _quantize_callback(main(["--config", str(_config("digits-qat-int4"))], run=False))

    assert callback.mode == "qat"


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
    with pytest.raises(SystemExit):
        main(["--config", str(_config("digits-int4")), override], run=False)

    assert field in capsys.readouterr().err


def test_bits_for_float_storage_fails_naming_fields() -> None:
    args = ["--config", str(_config("digits-int4")), "--trainer.callbacks.init_args.bits=3"]
    args.append("--trainer.callbacks.init_args.dtype=bfloat16")

    with pytest.raises(ConfigError, match=r"dtype='bfloat16' stores 16-bit weights; set bits=16"):
        main(args, run=False)
