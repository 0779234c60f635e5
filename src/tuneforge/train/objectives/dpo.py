"""DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", Eq. 7:

    L_DPO = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]

beta * log(pi/pi_ref) is the implicit reward (§5); its mean over chosen and rejected answers, their
margin and how often chosen wins are the metrics every DPO run reports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair losses (P,) from summed sequence log-probs of policy and reference (each (P,))."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
