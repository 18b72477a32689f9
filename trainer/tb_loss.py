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


def completion_logits(
    model,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits predicting each completion token, with each prompt computed once for its K completions.

    prompts, prompt_mask: (P, W), left-padded; completions, completion_mask: (P*K, T), the K
    completions of prompt i in rows i*K .. i*K+K-1. The prompt's keys and values are shared by its K
    completions (gradients flow back through them, so this is exact), so a prompt costs W + K*T
    token passes instead of K*(W + T): with short answers to long prompts, several times fewer.
    Returns (P*K, T, V).
    """
    k = completions.shape[0] // prompts.shape[0]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
    out = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].repeat_interleave(k, dim=0)  # (N, 1, V): the prompt's end predicts token 0
    if completions.shape[1] == 1:
        return first
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)  # (P, ...) -> (P*K, ...), still in the autograd graph
    start = prompt_mask.sum(-1).repeat_interleave(k)[:, None]  # (N, 1): real prompt tokens
    positions = start + torch.arange(completions.shape[1] - 1, device=completions.device)  # (N, T-1)
    attention = torch.cat([prompt_mask.repeat_interleave(k, dim=0), completion_mask[:, :-1].long()], dim=1)
    rest = model(
        input_ids=completions[:, :-1], attention_mask=attention, position_ids=positions, past_key_values=cache
    ).logits  # (N, T-1, V): token t predicts token t + 1
    return torch.cat([first, rest], dim=1)


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
