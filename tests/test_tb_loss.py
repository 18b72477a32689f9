"""The TB objective: a hand-computed value, its on-policy gradient, and prompts never mixed."""

import pytest
import torch

from trainer.tb_loss import linear_beta, tb_loss


def test_loss_equals_a_hand_computed_value_on_2_prompts_by_3_samples():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -4.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-1.0, -1.0, -3.0]])
    r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    beta = 0.5
    # prompt 1: residuals logp - ref - r/beta = [-1.5, -1.0, -1.0], logZ = 7/6, deviations [-1/3, 1/6, 1/6]
    # prompt 2: residuals [0.5, -2.5, -3.0], logZ = 5/3, deviations [13/6, -5/6, -4/3]
    expected = (1 / 9 + 1 / 36 + 1 / 36 + 169 / 36 + 25 / 36 + 16 / 9) / 6
    assert tb_loss(logp, ref, r, beta).item() == pytest.approx(expected, rel=1e-6)


def test_on_policy_gradient_is_reinforce_with_a_mean_baseline():
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    features = torch.randn(2, 5, 4)  # (P, K, D): log pi_theta = features @ theta, a log-linear policy
    ref = torch.randn(2, 5)
    r = torch.rand(2, 5)
    beta = 0.1
    logp = features @ theta  # (P, K)
    (tb_grad,) = torch.autograd.grad(tb_loss(logp, ref, r, beta), theta, retain_graph=True)
    # App. A: grad = -(2 / (P K)) sum_j (R_j - mean_k R_k) grad log pi(y_j), R = r / beta - (log pi - log pi_ref)
    reward = r / beta - (logp.detach() - ref)
    advantage = reward - reward.mean(dim=1, keepdim=True)
    (reinforce_grad,) = torch.autograd.grad(-(2 / logp.numel()) * (advantage * logp).sum(), theta)
    assert torch.allclose(tb_grad, reinforce_grad, atol=1e-5)


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_of_whole_prompts_accumulate_to_the_full_batch_gradient(micro):
    torch.manual_seed(1)
    theta = torch.randn(3, requires_grad=True)
    features, ref, r = torch.randn(6, 4, 3), torch.randn(6, 4), torch.rand(6, 4)
    (full,) = torch.autograd.grad(tb_loss(features @ theta, ref, r, 0.2), theta)
    acc = torch.zeros(3)
    for rows in torch.arange(6).split(micro):  # whole prompts per micro-batch: logZ never mixes prompts
        (g,) = torch.autograd.grad(tb_loss(features[rows] @ theta, ref[rows], r[rows], 0.2), theta)
        acc += g * len(rows) / 6
    assert torch.allclose(full, acc, atol=1e-6)
    # (were logZ pooled across prompts, each micro-batch would see a different baseline and this would fail)


def test_beta_anneals_linearly_then_holds():
    assert linear_beta(0, 0.012, 0.004, 500) == 0.012
    assert linear_beta(250, 0.012, 0.004, 500) == pytest.approx(0.008)
    assert linear_beta(800, 0.012, 0.004, 500) == 0.004


def test_a_prompt_shared_by_its_completions_gives_the_logits_and_gradients_of_whole_sequences():
    from policy.logprobs import completion_logits
    from tests.tiny_models import tiny_llama

    model, k, pad = tiny_llama(3).train(), 3, 0
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # left-padded to width 5
    completions = [[20, 21, 1], [22, 1, pad], [23, 24, 25], [30, 1, pad], [31, 32, 1], [33, 34, 35]]
    lengths = [3, 2, 3, 2, 3, 3]
    head = torch.tensor([[pad] * (5 - len(p)) + p for p in prompts])
    head_mask = torch.tensor([[0] * (5 - len(p)) + [1] * len(p) for p in prompts])
    tail = torch.tensor(completions)
    tail_mask = torch.tensor([[1.0] * n + [0.0] * (3 - n) for n in lengths])

    shared = completion_logits(model, head, head_mask, tail, tail_mask)
    (shared * tail_mask[..., None]).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # the plain way: every completion after its own copy of the prompt, one forward pass
    sequences = torch.cat([head.repeat_interleave(k, 0), tail], 1)
    attention = torch.cat([head_mask.repeat_interleave(k, 0), tail_mask.long()], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    whole = model(input_ids=sequences, attention_mask=attention, position_ids=positions).logits[:, 4:-1]
    (whole * tail_mask[..., None]).sum().backward()

    real = tail_mask.bool()
    assert torch.allclose(shared[real], whole[real], atol=1e-5)
    for mine, theirs in zip(shared_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-4)
