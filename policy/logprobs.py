"""Log-probabilities of completions under a causal LM, at the sampling temperature: what searchers and the
filter record as reference log-probs, and what the trainer's loss differentiates. One code path for all.
"""

from __future__ import annotations

import numpy as np
import torch


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token) at the sampling temperature. logits: (N, T, V) predicting token_ids (N, T). Returns (N, T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, T, V)
    return logp.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


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


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch (P, W), padded on the left so each ends where generation starts, and its mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


def padded(prompts: list[list[int]], completions: list[np.ndarray], pad_id: int):
    """What completion_logits takes: the prompts left-padded (P, W) and their completions right-padded (N, T),
    each with its mask (rows i*K .. i*K+K-1 of the completions are prompt i's)."""
    head, head_mask = left_padded(prompts, pad_id)
    tail = torch.full((len(completions), max(c.size for c in completions)), pad_id, dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for row, ids in enumerate(completions):
        tail[row, : ids.size] = torch.from_numpy(ids.astype(np.int64))
        tail_mask[row, : ids.size] = 1
    return head, head_mask, tail, tail_mask


@torch.no_grad()
def completions_token_logprobs(
    model, prompts: list[list[int]], completions: list[np.ndarray], pad_id: int, temperature: float
) -> list[np.ndarray]:
    """Each completion's per-token log-probs under model at the temperature, in one pass (each prompt once).

    completions holds the same number K of completions of each prompt, in the prompts' order (rows
    i*K .. i*K+K-1 are prompt i's). Returns one (T_j,) float32 array per completion.
    """
    device = next(model.parameters()).device
    head, head_mask, tail, tail_mask = (x.to(device) for x in padded(prompts, completions, pad_id))
    logp = token_logprobs(completion_logits(model, head, head_mask, tail, tail_mask), tail, temperature).cpu()
    return [logp[row, : ids.size].numpy().astype(np.float32) for row, ids in enumerate(completions)]
