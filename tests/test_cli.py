"""The mono-quant command: entry point, presets and inspect.

Subcommand behaviour and every error path are tested in tests/cli/.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.cli import main
from mono_quant.io import save


def test_presets_lists_every_preset(capsys) -> None:
    main(["presets"])

    printed = capsys.readouterr().out
    for name in mq.PRESETS:
        assert name in printed


def test_inspect_prints_layers(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    path = save(mq.quantize(model, "w8"), tmp_path / "model.pt")

    main(["inspect", str(path)])

    printed = capsys.readouterr().out
    assert "w8 weight-only" in printed
    assert "LayerNorm" in printed
    assert "skipped: normalization layers stay in float" in printed


@pytest.mark.parametrize("content", [b"not a model", None], ids=["garbage", "missing"])
def test_inspect_bad_file_exits_with_one_line_error(tmp_path, capsys, content) -> None:
    path = tmp_path / "input.pt"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(path)])

    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith("mono-quant: error:")
    assert len(error.splitlines()) == 1


def test_inspect_plain_state_dict_explains(tmp_path, capsys) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")

    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "plain.pt")])

    assert "must be quantized first" in capsys.readouterr().err
