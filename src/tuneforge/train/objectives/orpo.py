"""ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eqs. 6-7:

    L_ORPO = E[ L_SFT + lambda * L_OR ],   L_OR = -log sigma( log odds(y_w|x) - log odds(y_l|x) )
    odds(y|x) = P(y|x) / (1 - P(y|x)),     log P(y|x) = (1/|y|) sum_t log pi(y_t | x, y_<t)

L_SFT is the chosen answer's mean token negative log-likelihood. No reference model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_odds(mean_logprob: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P (< 0); log1p(-exp) keeps it exact for P near 0."""
    return mean_logprob - torch.log1p(-torch.exp(mean_logprob))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses (P,), the odds-ratio term L_OR (P,)) from summed log-probs and lengths."""
    mean_chosen = chosen / chosen_tokens.clamp(min=1)
    mean_rejected = rejected / rejected_tokens.clamp(min=1)
    odds_ratio_term = -F.logsigmoid(log_odds(mean_chosen) - log_odds(mean_rejected))
    return -mean_chosen + lam * odds_ratio_term, odds_ratio_term
