"""Held-out evaluation: greedy accuracy and the mean reward of one sample at the temperature."""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from ops.config import TbaConfig
from ops.metrics import mean, standard_error
from policy.tasks import RewardError, checked_rewards

log = logging.getLogger(__name__)
CHUNK = 64  # problems per generation call: 256 at once took 178 s on 2 cores, 4 calls of 64 121 s


class Stopped(Exception):
    """Told to stop between two chunks of an evaluation."""


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

    def _score(self, texts: list[str], finished: list[bool]) -> list[float | None]:
        """Each problem's reward, None where it could not be scored (as a searcher would: the others count)."""
        rewards = []
        for problem, text, done in zip(self.problems, texts, finished, strict=True):
            try:
                (reward,) = checked_rewards(self.task.score(problem, [text], [done]), 1, f"task {self.task.cfg.name!r}")
            except RewardError as exc:
                log.warning("evaluation of %s: %s", problem.prompt_id, exc)
                reward = None
            rewards.append(reward)
        return rewards

    @staticmethod
    def _texts(gen, prompts: list[list[int]], sample: bool, stop: threading.Event) -> tuple[list[str], list[bool]]:
        texts, finished = [], []
        for i in range(0, len(prompts), CHUNK):
            if stop.is_set():
                raise Stopped
            chunk_texts, chunk_finished = gen.texts(prompts[i : i + CHUNK], sample=sample)
            texts += chunk_texts
            finished += chunk_finished
        return texts, finished

    @torch.no_grad()
    def __call__(self, model, stop: threading.Event | None = None) -> dict | None:
        """Means with their standard errors over the problems scored, and which problems greedy decoding solved
        (one character each, in order: 1, 0, or - unscored), so two evaluations compare problem by problem.

        None if stop is set before it ends: it gives up at the next chunk of problems. A trainer told to stop
        checkpoints within its stop timeout (256 problems take ~2 minutes on 2 cores; a stop that waited for them
        ended in a kill and no checkpoint of the last steps)."""
        model.eval()
        gen = self._gen(model)
        prompts = [gen.prompt_ids(p.messages) for p in self.problems]
        try:
            greedy, sampled = (self._score(*self._texts(gen, prompts, mode, stop or threading.Event()))
                               for mode in (False, True))  # fmt: skip
        except Stopped:
            log.info("evaluation given up: told to stop")
            return None
        scored = np.array([r for r in greedy if r is not None], dtype=float)
        solved, rewards = (scored >= 1.0).astype(float), np.array([r for r in sampled if r is not None], dtype=float)
        return {"greedy_accuracy": mean(solved), "greedy_accuracy_se": standard_error(solved),
                "greedy_reward": mean(scored),
                "sampled_reward": mean(rewards), "sampled_reward_se": standard_error(rewards),
                "eval_problems": len(self.problems),
                "greedy_solved": "".join("-" if r is None else "01"[r >= 1.0] for r in greedy)}  # fmt: skip
