"""Tasks: where prompts come from and how completions are rewarded; one module per task, chosen in config.

Every task has `train` and `held_out` lists of Problems and one batch call,
`score(problem, texts, finished)`: one reward per completion of the problem (finished: whether it
ended with EOS), so reward models and judges score a whole group at once. `scored_samples` is the
one way from completions to rewarded Samples: searchers, the synchronous baseline and the evaluator
all go through it, and it checks what a task returns (one finite float per completion).

`task.reward_fn: "module:function"` replaces a task's own reward with any function called once per
group as fn(prompts=[...], completions=[...]) -> one float per completion (TRL's reward-function
shape): a verifier, a reward-model client, a rule. The redteam task hands it the target's answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isfinite  # not `import math`: the submodule policy.tasks.math would shadow it

from ops.config import TaskConfig
from ops.errors import ConfigError, TbaError
from ops.imports import import_callable
from schemas.records import Sample


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    question: str
    answer: str = ""  # the reference answer, where the task has one
    messages: tuple[dict, ...] = ()  # the chat the policy is prompted with


class RewardError(TbaError):
    """A reward could not be computed for one group: that group is sent nowhere, the caller goes on."""


def checked_rewards(rewards, n: int, source: str) -> list[float]:
    """rewards as n finite floats, or a RewardError that names where they came from."""
    try:
        values = [float(r) for r in rewards]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"{source}: returned {type(rewards).__name__}, not one number per completion") from exc
    if len(values) != n:
        raise RewardError(f"{source}: returned {len(values)} rewards for {n} completions")
    bad = [i for i, v in enumerate(values) if not isfinite(v)]
    if bad:
        raise RewardError(f"{source}: reward {values[bad[0]]} for completion {bad[0]} is not finite")
    return values


class RewardFunction:
    """task.reward_fn: fn(prompts=[...], completions=[...]) -> one finite float per completion."""

    def __init__(self, path: str):
        self.path = path
        self.fn: Callable = import_callable(path, "task.reward_fn")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        source = f"task.reward_fn {self.path!r}"
        try:
            rewards = self.fn(prompts=list(prompts), completions=list(completions))
        except Exception as exc:  # the user's code: its failure is this group's alone
            raise RewardError(f"{source}: raised {type(exc).__name__}: {exc}") from exc
        return checked_rewards(rewards, len(completions), source)


def reward_function(cfg: TaskConfig) -> RewardFunction | None:
    return RewardFunction(cfg.reward_fn) if cfg.reward_fn else None


class PerCompletionTask:
    """A task whose own reward looks at one completion's text at a time: reward(problem, text)."""

    reward_fn: RewardFunction | None = None

    def score(self, problem: Problem, texts: list[str], finished: list[bool]) -> list[float]:
        if self.reward_fn is not None:
            return self.reward_fn([problem.question] * len(texts), texts)
        return [self.reward(problem, text) for text in texts]


def scored_samples(task, problem: Problem, completions) -> list[Sample]:
    """The completions of one problem as Samples, rewarded by the task in one call (RewardError if it fails)."""
    texts = [c.text for c in completions]
    rewards = task.score(problem, texts, [c.finish_reason == "stop" for c in completions])
    rewards = checked_rewards(rewards, len(texts), f"task {task.cfg.name!r}")
    return [
        Sample(c.text, c.token_ids, c.logprobs, c.ref_logprobs, r, c.finish_reason)
        for c, r in zip(completions, rewards, strict=True)
    ]


def task_label(cfg: TaskConfig) -> str:
    """What a group's `task` field says: the reasoning-gym dataset for math, else the task's name."""
    return cfg.dataset if cfg.name == "math" else cfg.name


TASKS = {
    "math": "policy.tasks.math:MathTask",
    "toy": "policy.tasks.toy:ToyTask",
    "preference": "policy.tasks.preference:PreferenceTask",
    "redteam": "policy.tasks.redteam:RedTeamTask",
}


def build_task(cfg: TaskConfig):
    """The task named by task.name."""
    if cfg.name not in TASKS:
        raise ConfigError(f"task.name: {cfg.name!r} is not a task (available: {', '.join(map(repr, TASKS))})")
    return import_callable(TASKS[cfg.name], "task.name")(cfg)
