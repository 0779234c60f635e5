"""SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6:

    L_SimPO = -E[ log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma ) ]

No reference model: the reward is the length-normalised log-likelihood, gamma a target margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
               beta: float, gamma: float) -> torch.Tensor:
    """Per-pair losses (P,) from summed log-probs and completion lengths (each (P,))."""
    reward_margin = beta * chosen / chosen_tokens.clamp(min=1) - beta * rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(reward_margin - gamma)
