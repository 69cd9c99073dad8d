"""QuantizeCallback(mode="qat") in real Lightning loops on tiny models."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mono_quant.lightning import QuantizeCallback
from mono_quant.lightning.qat import load_qat_checkpoint
from mono_quant.nn import QuantizedLayer
from mono_quant.nn.fake_quant import FakeQuantize
from mono_quant.nn.qat import QATConvBn2d, QATLinear


def _data(samples: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 6, 6, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


class ConvNet(L.LightningModule):
    """Conv + BatchNorm + Linear classifier with deterministic, unshuffled data."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 36, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=16, shuffle=False)

    def val_dataloader(self):
        return DataLoader(_data(32, seed=1), batch_size=16)

    def test_dataloader(self):
        return DataLoader(_data(32, seed=2), batch_size=16)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **options)


def _quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantize)
        for key, value in module.state_dict().items()
    }


def _qat(**kwargs) -> QuantizeCallback:
    return QuantizeCallback(mode="qat", verbose=False, save_model=False, **kwargs)


def test_setup_swaps_layers_and_keeps_parameters(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    float_parameters = {id(p) for p in model.parameters()}
    callback = _qat(bits=4)

    _trainer(tmp_path, [callback], max_epochs=1).fit(model)

    assert isinstance(model.net[0], QATConvBn2d)
    assert isinstance(model.net[4], QATLinear)
    assert float_parameters <= {id(p) for p in model.parameters()}
    assert isinstance(callback.quantized_model.net[0], QuantizedLayer)
    assert isinstance(callback.quantized_model.net[4], QuantizedLayer)


def test_learnable_scales_reach_optimizer(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    trainer = _trainer(tmp_path, [_qat(bits=4)], max_epochs=1)

    trainer.fit(model)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    log_scale = model.net[4].weight_fake_quant.log_scale
    assert id(log_scale) in optimized
    assert not torch.equal(log_scale, log_scale.detach().clone().zero_())


@pytest.mark.parametrize(("bits", "learnable"), [(4, True), (2, True), (8, False)])
def test_learnable_scale_default_follows_bits(tmp_path: Path, bits: int, learnable: bool) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()

    _trainer(tmp_path, [_qat(bits=bits)], max_epochs=1).fit(model)

    assert model.net[4].weight_fake_quant.learnable_scale is learnable


@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8", "w4"])
def test_converted_matches_fake_quant(tmp_path: Path, bits: int) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    callback = _qat(bits=bits)
    _trainer(tmp_path, [callback]).fit(model)
    x = _data(32, seed=3).tensors[0]

    model.eval()
    with torch.no_grad():
        fake = model(x)
        converted = callback.quantized_model(x)

    # Both compute the same rounded weights and inputs; only float summation order may differ,
    # which is far below one output quantization step.
    tolerance = 1e-5 * (1.0 + fake.abs().max().item())
    assert (fake - converted).abs().max().item() <= tolerance
    assert callback.fake_quant_report.top1_agreement == 1.0


def test_evaluation_leaves_quantizers_untouched(tmp_path: Path) -> None:
    class Snapshots(L.Callback):
        def __init__(self) -> None:
            self.pairs: list[tuple[str, dict, dict]] = []

        def _start(self, pl_module):
            self.before = _quantizer_state(pl_module)

        def _end(self, stage, pl_module):
            self.pairs.append((stage, self.before, _quantizer_state(pl_module)))

        def on_sanity_check_start(self, trainer, pl_module):
            self._start(pl_module)

        def on_sanity_check_end(self, trainer, pl_module):
            self._end("sanity", pl_module)

        def on_validation_epoch_start(self, trainer, pl_module):
            self._start(pl_module)

        def on_validation_epoch_end(self, trainer, pl_module):
            self._end("validation", pl_module)

    L.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    model = ConvNet()
    trainer = _trainer(tmp_path, [_qat(bits=8), snapshots], num_sanity_val_steps=2)
    trainer.fit(model)
    before_test = _quantizer_state(model)
    trainer.test(model, verbose=False)
    trainer.predict(model, dataloaders=DataLoader(_data(16).tensors[0], batch_size=8))

    assert len(snapshots.pairs) >= 3
    for stage, before, after in snapshots.pairs:
        for key, value in before.items():
            assert torch.equal(value, after[key]), f"{stage} changed {key}"
    for key, value in _quantizer_state(model).items():
        assert torch.equal(value, before_test[key]), f"test/predict changed {key}"


def test_training_updates_activation_observer(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()

    _trainer(tmp_path, [_qat(bits=8)], max_epochs=1).fit(model)

    quantizer = model.net[4].input_fake_quant
    assert bool(quantizer.initialized)
    assert int(quantizer.observer.num_observed) == 6


def test_schedule_flags(tmp_path: Path) -> None:
    class Record(L.Callback):
        def __init__(self) -> None:
            self.flags: list[tuple[int, int, int, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            fake_quant = pl_module.net[4].weight_fake_quant
            self.flags.append(
                (
                    trainer.current_epoch,
                    int(fake_quant.fake_quant_enabled),
                    int(fake_quant.observer_enabled),
                    int(pl_module.net[0].freeze_bn),
                )
            )

    L.seed_everything(0, verbose=False)
    record = Record()
    callback = _qat(bits=8, qat_start_epoch=1, freeze_observers_epoch=2, freeze_bn_epoch=2)
    _trainer(tmp_path, [callback, record], max_epochs=3).fit(ConvNet())

    per_epoch = {epoch: (fq, obs, bn) for epoch, fq, obs, bn in record.flags}
    assert per_epoch[0] == (0, 1, 0)
    assert per_epoch[1] == (1, 1, 0)
    assert per_epoch[2] == (1, 0, 1)


def test_frozen_bn_keeps_running_stats(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    _trainer(tmp_path, [_qat(bits=8, freeze_bn_epoch=1)], max_epochs=1).fit(model)
    running_mean = model.net[0].bn.running_mean.clone()

    _trainer(tmp_path, [_qat(bits=8, freeze_bn_epoch=0)], max_epochs=1).fit(model)

    assert torch.equal(model.net[0].bn.running_mean, running_mean)


def test_zero_bn_weight_stays_finite() -> None:
    from mono_quant.transform.qat import prepare_qat

    model = ConvNet().net
    with torch.no_grad():
        model[1].weight[0] = 0.0
    prepare_qat(model, "w4")
    x = _data(8).tensors[0]

    model.train()
    train_out = model(x)
    model.eval()
    eval_out = model(x)

    assert torch.isfinite(train_out).all()
    assert torch.isfinite(eval_out).all()


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    straight = ConvNet()
    _trainer(tmp_path / "a", [_qat(bits=4)], max_epochs=4).fit(straight)

    L.seed_everything(0, verbose=False)
    first = ConvNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(
        tmp_path / "b", [_qat(bits=4), checkpoint], max_epochs=2, enable_checkpointing=True
    ).fit(first)
    resumed = ConvNet()
    _trainer(tmp_path / "b", [_qat(bits=4)], max_epochs=4).fit(
        resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )

    expected = straight.state_dict()
    actual = resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(value, actual[key]), key


def test_checkpoint_loads_without_trainer(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [_qat(bits=4), checkpoint], enable_checkpointing=True).fit(model)
    x = _data(16, seed=4).tensors[0]

    loaded = load_qat_checkpoint(ConvNet, tmp_path / "ckpt" / "last.ckpt")

    loaded.eval()
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_float_checkpoint_is_rejected_by_qat_loader(tmp_path: Path) -> None:
    model = ConvNet()
    trainer = _trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "float.ckpt")

    with pytest.raises(ValueError, match="contains no mono_quant QAT state"):
        load_qat_checkpoint(ConvNet, tmp_path / "float.ckpt")


def test_test_best_checkpoint_and_second_fit(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    callback = _qat(bits=4)
    trainer = _trainer(tmp_path, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(model)

    tested = trainer.test(ckpt_path="best", verbose=False)
    second = _qat(bits=4)
    _trainer(tmp_path, [second], max_epochs=1).fit(model)

    assert 0.0 <= tested[0]["test_acc"] <= 1.0
    assert isinstance(model.net[0], QATConvBn2d)
    assert second.quantized_model is not None


def test_same_trainer_tests_converted_model(tmp_path: Path) -> None:
    # The README's flow: fit with QAT, then test the converted copy on the same Trainer.
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    callback = _qat(bits=8)
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model)
    quantized = callback.quantized_model
    layer_types = [type(module) for module in quantized.modules()]

    tested = trainer.test(quantized, verbose=False)
    validated = trainer.validate(quantized, verbose=False)

    assert 0.0 <= tested[0]["test_acc"] <= 1.0
    assert "val_loss" in validated[0]
    assert [type(module) for module in quantized.modules()] == layer_types


def test_fit_rejects_converted_model(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    callback = _qat(bits=8)
    _trainer(tmp_path, [callback], max_epochs=1).fit(ConvNet())

    with pytest.raises(ValueError, match=r"already converted to integer layers.*float"):
        _trainer(tmp_path, [_qat(bits=8)], max_epochs=1).fit(callback.quantized_model)


def test_bf16_mixed_keeps_float32_scales(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    callback = _qat(bits=4, activations="static")

    _trainer(tmp_path, [callback], precision="bf16-mixed").fit(model)

    assert model.net[4].weight_fake_quant.log_scale.dtype == torch.float32
    assert model.net[4].input_fake_quant.scale.dtype == torch.float32
    assert callback.quantized_model.net[4].weight_scale.dtype == torch.float32
    assert torch.isfinite(callback.quantized_model(_data(8).tensors[0])).all()


def test_with_checkpoint_early_stopping_and_pruning(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    callback = _qat(bits=8)
    callbacks = [
        callback,
        ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss"),
        EarlyStopping(monitor="val_loss", patience=5),
        # Without parameters_to_prune, ModelPruning finds the layers after QAT has swapped them.
        ModelPruning("l1_unstructured", amount=0.5, parameter_names=["weight"]),
    ]

    _trainer(tmp_path, callbacks, enable_checkpointing=True).fit(model)

    pruned = model.net[4].weight == 0
    codes = callback.quantized_model.net[4].weight_int()
    assert pruned.float().mean() >= 0.45
    assert torch.all(codes[pruned] == 0)


def test_keyword_and_tuple_forward(tmp_path: Path) -> None:
    class Flexible(ConvNet):
        def forward(self, x, scale: float = 1.0, ids: torch.Tensor | None = None):
            logits = self.net(x * scale)
            if ids is not None:
                logits = logits + ids.float().unsqueeze(1) * 0
            return logits, logits.detach().argmax(1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits, _ = self(x, scale=1.0, ids=torch.arange(len(x)))
            return F.cross_entropy(logits, y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits, _ = self(x, scale=1.0)
            self.log("val_loss", F.cross_entropy(logits, y))

    L.seed_everything(0, verbose=False)
    model = Flexible()
    callback = _qat(bits=4)

    _trainer(tmp_path, [callback], max_epochs=1).fit(model)

    logits, labels = callback.quantized_model(_data(8).tensors[0], scale=1.0, ids=torch.arange(8))
    assert logits.shape == (8, 4)
    assert labels.dtype == torch.int64


def test_qat_rejects_float_bits() -> None:
    with pytest.raises(ValueError, match="mode='qat' needs integer bits"):
        QuantizeCallback(bits=16, mode="qat")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qat_start_epoch": -1}, "qat_start_epoch=-1"),
        ({"freeze_bn_epoch": -2}, "freeze_bn_epoch=-2"),
        ({"mode": "train"}, "mode='train' is not supported"),
    ],
)
def test_invalid_qat_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizeCallback(**kwargs)


def test_qat_model_copy_keeps_training_mode() -> None:
    from mono_quant.transform.qat import convert_qat, prepare_qat

    model = prepare_qat(ConvNet().net, "w8a8")
    model.train()
    model(_data(16).tensors[0])

    converted = convert_qat(copy.deepcopy(model))

    assert model.training
    assert isinstance(converted[0], QuantizedLayer)


NO_ENGINE_SCRIPT = """
import sys
import torch

# Hide every quantized engine and make the deprecated torch.ao flow unimportable.
type(torch.backends.quantized).supported_engines = property(lambda self: [])
type(torch.backends.quantized).engine = property(lambda self: "none")
for name in list(sys.modules):
    if name.startswith("torch.ao.quantization"):
        del sys.modules[name]
sys.modules["torch.ao.quantization"] = None

import torch.nn.functional as F
from torch import nn
import mono_quant as mq
from mono_quant.transform.qat import convert_qat, prepare_qat

torch.manual_seed(0)
layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)]
model = nn.Sequential(*layers)
prepare_qat(model, "w8a8")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
for _ in range(3):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
converted = convert_qat(model)
ptq = mq.quantize(nn.Linear(8, 2), "w8")
assert torch.isfinite(converted(x)).all()
assert torch.backends.quantized.supported_engines == []
print("ok", float((converted(x) - model(x)).abs().max()), ptq(torch.randn(2, 8)).shape)
"""


def test_qat_without_quantized_engine() -> None:
    import subprocess
    import sys

    source = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", NO_ENGINE_SCRIPT],
        env={"PYTHONPATH": str(source), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_qat_leaves_unsupported_layers_float() -> None:
    from mono_quant import quantization_report
    from mono_quant.transform.qat import convert_qat, prepare_qat

    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 4))
    prepare_qat(model, "w8")
    model(torch.randint(0, 10, (2, 3)))

    converted = convert_qat(model)

    assert type(model[0]) is nn.Embedding
    assert isinstance(converted[2], QuantizedLayer)
    reasons = quantization_report(converted).summary()["float_layers"]
    assert "Embedding stays in float during QAT" in reasons["0"]


def test_loader_ignores_lightning_cli_entries(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    trainer = _trainer(tmp_path, [_qat(bits=4)], max_epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    checkpoint = torch.load(tmp_path / "qat.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "tests.ConvNet"
    checkpoint["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save(checkpoint, tmp_path / "cli.ckpt")

    loaded = load_qat_checkpoint(ConvNet, tmp_path / "cli.ckpt")

    assert loaded.hparams.lr == model.hparams.lr
    assert isinstance(loaded.net[0], QATConvBn2d)


def test_fresh_trainer_tests_qat_checkpoint(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = ConvNet()
    trainer = _trainer(tmp_path, [_qat(bits=4)], max_epochs=1)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    expected = trainer.test(model, verbose=False)

    fresh = _trainer(tmp_path, [_qat(bits=4)])
    results = fresh.test(ConvNet(), ckpt_path=str(tmp_path / "qat.ckpt"), verbose=False)

    assert results[0]["test_acc"] == expected[0]["test_acc"]


def test_folded_batch_norm_not_reported_float(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    callback = _qat(bits=4)

    _trainer(tmp_path, [callback], max_epochs=1).fit(ConvNet())

    rows = {row.name: row for row in callback.layer_report.layers}
    assert "net.1" not in rows
    assert rows["net.0"].type_name == "Conv2d + BatchNorm2d"


def test_qat_report_float_size_excludes_quantizers(tmp_path: Path) -> None:
    from mono_quant import model_size_bytes

    L.seed_everything(0, verbose=False)
    callback = _qat(bits=4)

    _trainer(tmp_path, [callback], max_epochs=1).fit(ConvNet())

    assert callback.report.float_size_bytes == model_size_bytes(ConvNet())
    assert callback.fake_quant_report.reference_label == "fake-quant"
