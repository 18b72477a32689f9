"""The Trajectory Balance objective of TBA (VarGrad's logZ), for groups of K samples of the same prompt.

    logZ(x) = mean_j [ r_j / beta + log pi_ref(y_j|x) - log pi_theta(y_j|x) ]      (stop-gradient: VarGrad)
    loss    = mean_j ( logZ(x) + log pi_theta(y_j|x) - log pi_ref(y_j|x) - r_j / beta )^2

Log-probs are sums over completion tokens at the sampling temperature (no length normalisation;
padding contributes nothing). No importance weights and no clipping: TB is valid off-policy.
Every tensor is (P, K): P prompts, K samples each, so logZ never mixes prompts; a micro-batch is
a subset of whole rows.
"""

from __future__ import annotations

import torch


def tb_loss(logp: torch.Tensor, ref_logp: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """TB loss with the VarGrad logZ estimate, averaged over every sample.

    logp: (P, K) log pi_theta(y|x), with gradient; ref_logp, rewards: (P, K). Returns a scalar.
    """
    residual = logp - ref_logp - rewards / beta  # (P, K)
    log_z = -residual.detach().mean(dim=1, keepdim=True)  # (P, 1), one estimate per prompt
    return (log_z + residual).pow(2).mean()


def linear_beta(step: int, start: float, end: float, anneal_steps: int) -> float:
    """beta annealed linearly from start to end over anneal_steps, then held (paper: 0.012 -> 0.004)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps
