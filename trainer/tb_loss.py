"""The Trajectory Balance objective, as in DESIGN.md, for groups of K samples of the same prompt.

    logZ(x) = mean_j [ r_j / beta + log pi_ref(y_j|x) - log pi_theta(y_j|x) ]      (stop-gradient: VarGrad)
    loss    = mean_j ( logZ(x) + log pi_theta(y_j|x) - log pi_ref(y_j|x) - r_j / beta )^2

Log-probs are sums over completion tokens at the sampling temperature (no length normalisation;
padding contributes nothing). No importance weights and no clipping: TB is valid off-policy.
Every tensor is (P, K): P prompts, K samples each, so logZ never mixes prompts; a micro-batch is
a subset of whole rows.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) at the sampling temperature. logits: (N, T, V) predicting token_ids (N, T). Returns (N, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, T, V)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


def sequence_logprobs(
    logits: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum of log pi(token) over completion tokens at the sampling temperature.

    logits: (N, T, V) predicting completion_ids (N, T) (already shifted); completion_mask: (N, T), 1 on
    real completion tokens, 0 on padding. Returns (N,).
    """
    return (token_logprobs(logits, completion_ids, temperature) * completion_mask).sum(-1)  # (N,)


def completion_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits predicting each completion token of left-padded prompt + completion sequences.

    sequences, attention_mask: (N, P + T) with prompts left-padded to P. Returns (N, T, V).
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions).logits
    return logits[:, prompt_len - 1 : -1]  # (N, T, V): position t predicts token t + 1


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
