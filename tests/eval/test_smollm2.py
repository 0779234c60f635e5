"""The real embedded SmolLM2-135M-Instruct answering bundled arithmetic questions (one slow test)."""

from __future__ import annotations

import pytest

from tuneforge.data import load_examples
from tuneforge.eval import score_generation


@pytest.mark.slow
def test_smollm2_base_scores_arithmetic():
    models = pytest.importorskip("tuneforge.models")
    from tuneforge.errors import ModelLoadError

    try:
        loaded = models.load_model("smollm2-135m", dtype="float32", device="cpu")
    except ModelLoadError as error:
        pytest.skip(f"smollm2-135m cannot be loaded here: {error}")
    examples = load_examples("arithmetic", split="eval").examples[:8]

    score = score_generation(loaded.model, loaded.tokenizer, examples, max_new_tokens=8, batch_size=8,
                             progress=False, num_samples=8)

    assert score.n == 8
    assert 0.0 <= score.exact_match <= score.contains <= 1.0
    predictions = [prediction for _, prediction, _ in score.samples]
    assert all(predictions), predictions
    # A chat model's reply is text, not a continuation of the template: no role markers leak in.
    assert not any("<|im_" in prediction or prediction.startswith("assistant") for prediction in predictions)
