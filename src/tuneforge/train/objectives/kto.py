"""KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8:

    r(x, y) = log pi(y|x) / pi_ref(y|x)
    z_0     = KL(pi(y'|x) || pi_ref(y'|x))        (a reference point, not backpropagated)
    v(x, y) = lambda_D sigma(beta (r - z_0))   if y is desirable
              lambda_U sigma(beta (z_0 - r))   if y is undesirable
    L_KTO   = E[ lambda_y - v(x, y) ]

z_0 is estimated as in the paper (§4) and TRL: each prompt of the batch is paired with another
example's completion (the batch cycled by one), and the mean log-ratio of those mismatched pairs,
clamped at 0 (a KL is never negative), is the reference point; it carries no gradient.
"""

from __future__ import annotations

import torch


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl_estimate: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example losses (B,) from summed log-probs (B,), labels (B,) bool and z_0 (scalar)."""
    reward = policy - reference
    z0 = kl_estimate.detach().clamp(min=0)
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (reward - z0)),
                        undesirable_weight * torch.sigmoid(beta * (z0 - reward)))
    weight = torch.where(desirable, torch.full_like(reward, desirable_weight), torch.full_like(reward, undesirable_weight))
    return weight - value


def kl_reference_point(mismatched_policy: torch.Tensor, mismatched_reference: torch.Tensor) -> torch.Tensor:
    """z_0 from the summed log-probs (B,) of the mismatched (x, y') pairs: mean log-ratio, detached, >= 0."""
    return (mismatched_policy - mismatched_reference).detach().mean().clamp(min=0)
