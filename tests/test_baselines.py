"""RLOO and GRPO losses: their gradients are the textbook policy-gradient estimators."""

import torch

from trainer.baselines import grpo_loss, penalised_rewards, rloo_loss


def test_rloo_gradient_uses_the_leave_one_out_baseline():
    theta = torch.randn(3, requires_grad=True)
    features = torch.randn(2, 4, 3)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    logp = features @ theta  # (P, K)
    (grad,) = torch.autograd.grad(rloo_loss(logp, rewards), theta)
    expected = torch.zeros(3)
    for p in range(2):
        for j in range(4):
            others = (rewards[p].sum() - rewards[p, j]) / 3
            expected -= (rewards[p, j] - others) * features[p, j] / 8
    assert torch.allclose(grad, expected, atol=1e-6)


def test_grpo_normalises_advantages_per_prompt_and_averages_over_tokens():
    token_logp = torch.randn(1, 3, 5, requires_grad=True)
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]], dtype=torch.float32)
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    (grad,) = torch.autograd.grad(grpo_loss(token_logp, mask, rewards), token_logp)
    advantage = torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-4)  # mean 1, std 1
    assert torch.allclose(grad[0], -(advantage[:, None] * mask[0]) / 9, atol=1e-6)
    # equal rewards carry no signal
    (flat,) = torch.autograd.grad(grpo_loss(token_logp, mask, torch.ones(1, 3)), token_logp)
    assert torch.count_nonzero(flat) == 0


def test_kl_penalty_lowers_rewards_of_samples_the_policy_favours_over_the_reference():
    r = penalised_rewards(torch.ones(1, 2), torch.tensor([[-1.0, -5.0]]), torch.tensor([[-3.0, -3.0]]), beta=0.5)
    assert r.tolist() == [[0.0, 2.0]]
