"""ε of the central-DP federation (``federated.privacy``), by Rényi-DP accounting of the Gaussian mechanism.

Each round the server adds N(0, (σ·C)²) noise to the sum of the m clipped updates (std σ·C/m on their
average, ``apps.ScreenedFedAvg._private_average``): the Gaussian mechanism with L2 sensitivity C and noise
multiplier σ, one client's whole update being the unit of privacy (user-level DP, Geyer et al. 2017,
arXiv:1710.06963). Every client takes part in every round, so there is no subsampling amplification.

Mironov, "Rényi Differential Privacy", CSF 2017, arXiv:1702.07476: the Gaussian mechanism is (α, α/(2σ²))-RDP
(Proposition 7), T rounds compose to (α, T·α/(2σ²))-RDP (Proposition 1), and (α, ε_α)-RDP implies
(ε_α + log(1/δ)/(α − 1), δ)-DP (Proposition 3). Minimised over α > 1 (α* = 1 + σ·√(2·log(1/δ)/T)):

    ε(δ) = T/(2σ²) + √(2·T·log(1/δ)) / σ

A maintained accountant (Google's dp-accounting, Opacus) would give the same number for this mechanism
(tighter conversions shave a little); neither is a dependency of tuneforge.
"""

from __future__ import annotations

import math


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` Gaussian-mechanism rounds of noise multiplier σ at the given δ (inf for σ = 0)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    log_inverse_delta = math.log(1 / delta)
    return rounds / (2 * noise_multiplier**2) + math.sqrt(2 * rounds * log_inverse_delta) / noise_multiplier


def privacy_report(clipping_norm: float, noise_multiplier: float, delta: float, rounds: int) -> dict:
    """What ``federated_results.json`` records under ``privacy``: the settings and the ε they give."""
    epsilon = gaussian_epsilon(noise_multiplier, rounds, delta)
    return {"clipping_norm": clipping_norm, "noise_multiplier": noise_multiplier, "delta": delta,
            "rounds": rounds, "epsilon": epsilon if math.isfinite(epsilon) else None,
            "accountant": "Renyi DP of the Gaussian mechanism, every client in every round (Mironov 2017)"}
