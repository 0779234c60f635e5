"""Per-token log-probabilities of the labelled tokens, computed in chunks like the SFT loss.

Preference and reward objectives need log pi(y|x) per sequence, not a summed cross-entropy. As in
losses.py only labelled positions go through the LM head, chunk by chunk with the chunk's logits
recomputed in backward, so the (tokens x vocab) logits never exist at once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuneforge.losses import IGNORE_INDEX, backbone_and_head, hidden_states


def label_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) bool: the positions whose next token is labelled (position t predicts token t+1)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (B, T-1) float32, zero where unlabelled; the label mask (B, T-1) bool).

    Position t holds log p(token t+1 | tokens <= t), as in the causal-LM loss."""
    hidden = hidden_states(model, batch)  # (B, T, H)
    keep = label_mask(batch)
    logprobs = logprobs_from_hidden(model, batch, hidden[:, :-1][keep], chunk_size, keep)
    if not keep.any():
        logprobs = logprobs + hidden.sum() * 0.0  # keeps the graph connected when nothing is labelled
    return logprobs, keep


def logprobs_from_hidden(model: nn.Module, batch: dict[str, torch.Tensor], selected: torch.Tensor,
                         chunk_size: int = 1024, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs (B, T-1) float32, zero where unlabelled, from the final hidden states (N, H) at
    the positions that predict a labelled token (:func:`labelled_hidden_states`). ``keep``: the batch's
    :func:`label_mask`, when the caller has it already."""
    _, head = backbone_and_head(model)
    keep = label_mask(batch) if keep is None else keep
    targets = batch["labels"][:, 1:][keep]  # (N,)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    pieces = []
    for start in range(0, int(targets.numel()), chunk_size):
        chunk, chunk_targets = selected[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, head, chunk, chunk_targets, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, chunk, chunk_targets, softcap))
    out = selected.new_zeros(keep.shape, dtype=torch.float32)
    return out.masked_scatter(keep, torch.cat(pieces)) if pieces else out


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of labelled-token log-probs per row (B,), labelled tokens per row (B,))."""
    logprobs, keep = token_logprobs(model, batch, chunk_size)
    return logprobs.sum(dim=1), keep.sum(dim=1)


def _chunk_logprobs(head: nn.Module, chunk: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = _logits(head, chunk, softcap)  # (n, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)  # (n,)


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (2P,), labelled tokens (2P,)) as [chosen_1..chosen_P, rejected_1..rejected_P],
    from either pair layout: 2P padded rows, or rows holding each pair's prompt once, one or several
    pairs per row (``label_segments`` numbers each labelled position's answer, see data/preference.py)."""
    if "label_segments" not in batch:
        return sequence_logprobs(model, batch, chunk_size)
    logprobs, _ = token_logprobs(model, batch, chunk_size)
    return per_answer_sums(logprobs, batch)


def per_answer_sums(per_token: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums of a per-token value (B, T-1) over each answer, labelled tokens per answer), in either pair layout."""
    if "label_segments" not in batch:
        keep = label_mask(batch)
        return (per_token * keep).sum(dim=1), keep.sum(dim=1)
    segments = batch["label_segments"][:, 1:]  # (B, T-1), aligned with the predictions
    answers = int(batch["example_ids"].numel())  # 2P
    labelled = segments >= 0
    owners = segments[labelled]  # (N,)
    sums = per_token.new_zeros(answers).index_add(0, owners, per_token[labelled])
    counts = torch.zeros(answers, dtype=torch.long, device=owners.device).index_add(0, owners, torch.ones_like(owners))
    return sums, counts


def labelled_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states (N, H) at the N positions that predict a labelled token."""
    hidden = hidden_states(model, batch)
    return hidden[:, :-1][label_mask(batch)]


@torch.no_grad()
def token_kl(model: nn.Module, batch: dict[str, torch.Tensor], policy_hidden: torch.Tensor,
             reference_hidden: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Exact per-token KL(policy || reference) over the whole vocabulary, (B, T-1) float32, zero where
    unlabelled: sum_v p(v) (log p(v) - log q(v)) at each position that predicts a labelled token.
    ``policy_hidden`` and ``reference_hidden`` are :func:`labelled_hidden_states` under the policy's and
    the reference's weights. For metrics only."""
    _, head = backbone_and_head(model)
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    pieces = []
    for start in range(0, int(policy_hidden.shape[0]), chunk_size):
        policy = _log_softmax(head, policy_hidden[start:start + chunk_size], softcap)
        reference = _log_softmax(head, reference_hidden[start:start + chunk_size], softcap)
        pieces.append((policy.exp() * (policy - reference)).sum(dim=-1))
    keep = label_mask(batch)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    return out.masked_scatter(keep, torch.cat(pieces)) if pieces else out


def _log_softmax(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.log_softmax(_logits(head, hidden, softcap), dim=-1)


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits, soft-capped as Gemma 2/3 do (``final_logit_softcapping``)."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
