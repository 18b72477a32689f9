"""Tasks: where prompts come from and how completions are rewarded; one module per task, chosen in config.

A task has `train` and `held_out` lists of Problems and `score(problem, texts, finished)`: one
reward per completion of the problem (finished: whether it ended with EOS), so reward models can
score a whole group in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ops.config import TaskConfig
from ops.errors import ConfigError


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    question: str
    answer: str = ""  # the reference answer, where the task has one
    messages: tuple[dict, ...] = ()  # the chat the policy is prompted with


class PerCompletionTask:
    """A task whose reward looks at one completion's text at a time: reward(problem, text)."""

    def score(self, problem, texts: list[str], finished: list[bool]) -> list[float]:
        return [self.reward(problem, text) for text in texts]


def build_task(cfg: TaskConfig):
    """The task named by task.name."""
    if cfg.name == "math":
        from producers.tasks.math import MathTask

        return MathTask(cfg)
    if cfg.name == "toy":
        from producers.tasks.toy import ToyTask

        return ToyTask(cfg)
    if cfg.name == "preference":
        from producers.tasks.preference import PreferenceTask

        return PreferenceTask(cfg)
    if cfg.name == "redteam":
        from producers.tasks.redteam import RedTeamTask

        return RedTeamTask(cfg)
    raise ConfigError(f"task.name: {cfg.name!r} is not a task (available: 'math', 'toy', 'preference', 'redteam')")
