"""Mean next-token loss (and so perplexity) over the labelled tokens of a set of batches."""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.losses import token_loss_sum
from tuneforge.models.precision import autocast


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches, precision: str = "fp32", chunk_size: int = 1024,
                  device: torch.device | None = None) -> float:
    """Mean loss per labelled token; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            loss_sum, n = token_loss_sum(model, batch, chunk_size)
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return total / max(count, 1)
