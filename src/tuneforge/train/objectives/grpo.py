"""GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models", §4.1, Eq. 3 (objective), Eq. 4 (KL estimator) and the outcome-supervision
advantage:

    A_i    = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                        group-normalised
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = pi_ref/pi - log(pi_ref/pi) - 1                                (the k3 estimator, Eq. 4)
    J      = 1/G sum_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) - beta KL_it ]

The loss is -J. std is the sample standard deviation plus 1e-4, so a group whose samples all got
the same reward has zero advantage rather than a division by zero (as in TRL).
"""

from __future__ import annotations

import torch

STD_EPSILON = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages (N,) for rewards (N,) laid out as consecutive groups of ``group_size``."""
    grouped = rewards.view(-1, group_size)  # (prompts, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + STD_EPSILON)).reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, clip_epsilon: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses (N,), per-sample mean KL (N,)) from per-token log-probs (N, T) and a mask (N, T)."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon)
    surrogate = torch.minimum(ratio * advantages[:, None], clipped * advantages[:, None])
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -(surrogate - beta * kl) * mask
    lengths = mask.sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / lengths, (kl * mask).sum(dim=1) / lengths
