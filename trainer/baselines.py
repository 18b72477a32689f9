"""Policy-gradient baselines for honest comparisons, on the same (P, K) groups as TB.

Both are on-policy (one update per freshly generated batch, so the importance ratio is 1 and there
is nothing to clip). Rewards may carry a KL penalty against the reference, as RLHF practice does:
r_j - beta * (log pi_theta(y_j) - log pi_ref(y_j)).

RLOO:  A_j = r_j - mean_{k != j} r_k;       loss = -mean_j A_j * log pi_theta(y_j)
GRPO:  A_j = (r_j - mean r) / (std r + eps); loss = -sum_{j,t} A_j * log pi_theta(y_j,t) / sum_j |y_j|
       (token-level: the sum over the tokens of a micro-batch of whole prompts, over its token count;
       the trainer weights micro-batches by their prompts, so with one micro-batch a step this is the
       normalisation of DAPO and of TRL's default loss)
"""

from __future__ import annotations

import torch


def penalised_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """(P, K) rewards minus beta times the sequence log-ratio to the reference (no gradient through it)."""
    return rewards - beta * (logp.detach() - ref_logp)


def rloo_loss(logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """logp, rewards: (P, K). Leave-one-out baseline per prompt."""
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # (P, K)
    return -((rewards - baseline) * logp).mean()


def grpo_loss(token_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """token_logp, mask: (P, K, T); rewards: (P, K). Group-normalised advantages, token-level average."""
    advantage = (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)  # (P, K)
    return -(advantage[..., None] * token_logp * mask).sum() / mask.sum()
