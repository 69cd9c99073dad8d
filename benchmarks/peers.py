"""Other PyTorch quantizers, built with the same interface as the mono-quant variants.

Peers quantize only ``nn.Linear`` layers (their defaults), so in a model with convolutions
those stay in float32 for the peers.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from benchmarks.variants import PEER, Builder, SkippedVariant, Variant

# Messages of the warnings torch 2.13 raises on every use of the deprecated torch.ao eager
# quantization API. They are expected here, where torch.ao is only a comparator.
_TORCH_AO_WARNINGS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"),
)


@contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Suppress the torch.ao deprecation warnings inside the block, and no other warnings."""
    with warnings.catch_warnings():
        for category, message in _TORCH_AO_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def torch_ao_engine() -> str:
    """Return the quantized engine used for torch.ao: ``x86`` where available, else ``fbgemm``."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    raise RuntimeError(
        f"torch.ao dynamic quantization needs the x86 or fbgemm engine; this torch build has "
        f"{engines}."
    )


def _torch_ao_dynamic(model: nn.Module, calibration: Sequence[Any]) -> nn.Module:
    torch.backends.quantized.engine = torch_ao_engine()
    with quiet_torch_ao():
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def _import_torchao() -> Any:
    """Import ``torchao.quantization`` with its import-time log lines silenced.

    torchao 0.18 logs a warning for each optional CUDA extension it cannot load, and torch
    logs an Enum-registration warning; neither matters on a CPU.
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as torchao_quantization
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return torchao_quantization


def _torchao_builder(make_config: Callable[[], Any]) -> Builder:
    def build(model: nn.Module, calibration: Sequence[Any]) -> nn.Module:
        torchao_quantization = _import_torchao()
        quantized = copy.deepcopy(model)
        torchao_quantization.quantize_(quantized, make_config())
        return quantized

    return build


def _torchao_variants() -> tuple[list[Variant], list[SkippedVariant]]:
    try:
        torchao_quantization = _import_torchao()
    except ImportError as error:
        reason = f"torchao is not importable ({error}); install the bench extra"
        return [], [SkippedVariant("torchao (all configs)", reason)]

    import torchao

    version = getattr(torchao, "__version__", "unknown version")
    q = torchao_quantization
    configs: list[tuple[str, Callable[[], Any]]] = [
        ("int8 weight-only", q.Int8WeightOnlyConfig),
        ("int8 dynamic-act", q.Int8DynamicActivationInt8WeightConfig),
        # Int4WeightOnlyConfig needs CUDA or the mslk package in torchao 0.18, so on a plain
        # CPU install it raises and appears as a footnote.
        ("int4 weight-only g128", lambda: q.Int4WeightOnlyConfig(group_size=128)),
        (
            "intx int4 weight-only g32",
            lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(32)),
        ),
        (
            "intx int4 weight-only g128",
            lambda: q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(128)),
        ),
    ]
    variants = [
        Variant(f"torchao {name}", PEER, _torchao_builder(make_config))
        for name, make_config in configs
    ]
    logging.getLogger(__name__).info("torchao %s found; %d configs", version, len(variants))
    return variants, []


def peer_variants() -> tuple[list[Variant], list[SkippedVariant]]:
    """Return the peers that can be tried here and the ones skipped because of a missing package.

    A peer that imports but fails to build or run on a given model is skipped later, per model,
    with the error as the footnote.
    """
    variants = [Variant("torch.ao dynamic int8", PEER, _torch_ao_dynamic)]
    torchao_variants, skipped = _torchao_variants()
    return variants + torchao_variants, skipped


def torchao_version() -> str | None:
    """Return the installed torchao version, or ``None`` when it does not import."""
    try:
        _import_torchao()
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")
