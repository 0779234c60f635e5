"""DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", Eq. 7:

    L_DPO = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]

beta * log(pi/pi_ref) is the implicit reward (§5); its mean over chosen and rejected answers, their
margin and how often chosen wins are the metrics every DPO run reports.

DPO+NLL (``training.rpo_alpha``): Pang et al. 2024, "Iterative Reasoning Preference Optimization",
Eq. 1, adds the chosen answer's negative log-likelihood normalised by its length,

    L = L_DPO + alpha * ( -log pi(y_w|x) / |y_w| ),

which the paper finds crucial on reasoning tasks: DPO alone can lower the chosen answer's likelihood
while it widens the margin. The paper weights the DPO term by alpha instead and trains with alpha = 1,
where the two forms are the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair losses (P,) from summed sequence log-probs of policy and reference (each (P,))."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def chosen_nll(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair -log pi(y_w|x) / |y_w| (P,), from the chosen answers' summed log-probs and token counts."""
    return -chosen / chosen_tokens.clamp(min=1)
