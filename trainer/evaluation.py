"""Held-out evaluation: greedy accuracy and the mean reward of one sample at the temperature."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ops.config import TbaConfig
from policy.tasks import RewardError, checked_rewards

log = logging.getLogger(__name__)


class Evaluator:
    """Held-out evaluation: greedy accuracy (reward >= 1) and mean reward of one sample at the temperature."""

    def __init__(self, cfg: TbaConfig, task, tokenizer):
        from policy.generation import HFGenerator

        self.problems = task.held_out[: cfg.trainer.eval_prompts]
        self.task = task
        self.tokenizer = tokenizer
        self._gen = lambda model: HFGenerator(
            model, tokenizer, None, cfg.trainer.temperature, cfg.trainer.eval_max_new_tokens
        )

    def _score(self, texts: list[str], finished: list[bool]) -> list[float]:
        rewards = []
        for problem, text, done in zip(self.problems, texts, finished, strict=True):
            try:
                (reward,) = checked_rewards(self.task.score(problem, [text], [done]), 1, f"task {self.task.cfg.name!r}")
            except RewardError as exc:  # as a searcher would: this one goes unscored, the others count
                log.warning("evaluation of %s: %s", problem.prompt_id, exc)
                continue
            rewards.append(reward)
        return rewards

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        gen = self._gen(model)
        prompts = [gen.prompt_ids(p.messages) for p in self.problems]
        greedy, sampled = (self._score(*gen.texts(prompts, sample=mode)) for mode in (False, True))
        mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        return {"greedy_accuracy": mean([r >= 1.0 for r in greedy]), "greedy_reward": mean(greedy),
                "sampled_reward": mean(sampled)}  # fmt: skip
