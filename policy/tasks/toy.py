"""A toy task for smoke tests of the whole loop: reward = share of completion characters in a target set.

Any model, even a tiny random one, can learn it within a few dozen steps, so it shows that learning
flows searcher -> Kafka -> filter -> trainer -> weight sync -> searcher; it says nothing about reasoning.
"""

from __future__ import annotations

from policy.tasks import PerCompletionTask, Problem, reward_function


class ToyTask(PerCompletionTask):
    def __init__(self, cfg):
        self.cfg = cfg
        self.target = set(cfg.dataset_args.get("target", "0123456789"))
        questions = [f"Say some digits ({i})." for i in range(cfg.train_size + cfg.eval_size)]
        problems = [
            Problem(f"toy-{cfg.seed}-{i}", q, "", ({"role": "user", "content": q},)) for i, q in enumerate(questions)
        ]
        self.train = problems[: cfg.train_size]
        self.held_out = problems[cfg.train_size :]
        self.reward_fn = reward_function(cfg)

    def reward(self, problem: Problem, completion: str) -> float:
        text = completion.strip()
        return sum(c in self.target for c in text) / len(text) if text else 0.0
