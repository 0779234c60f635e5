"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", Eq. 17 (the empirical IPO loss):

    L_IPO = E[ ( h - 1/(2 tau) )^2 ],   h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)

with tau the regularisation (``training.beta``). The log-ratios are per-token means over each
completion, as the authors' own experiments and TRL use: a summed h grows with length and makes one
tau mean different things for short and long answers.
"""

from __future__ import annotations

import torch


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-pair losses (P,) from summed log-probs and completion lengths (each (P,))."""
    h = (chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (rejected - ref_rejected) / rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * tau)) ** 2
