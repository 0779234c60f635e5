"""Chunked cross-entropy equals the plain full-logits loss, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.losses import token_loss_sum


def reference_loss_sum(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_loss_and_grads_match_reference(make_model, chunk_size):
    model = make_model()
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    ids = sample_ids(batch=2, length=11)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    batch = {"input_ids": ids, "labels": labels}
    expected = reference_loss_sum(model, batch)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    total, count = token_loss_sum(model, batch, chunk_size)
    total.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
