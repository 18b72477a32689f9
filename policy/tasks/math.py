"""Math reasoning: procedural reasoning-gym problems, rewarded by math-verify on the final answer.

The prompt keeps the model's own system prompt and adds a one-shot exchange that shows the answer
format, as measured best for SmolLM2-135M (zero-shot it never uses the tag). The reward is 1 for a
correct final answer whether or not the tag is used (the tag's content first, else the last number
in the text), plus an optional small bonus for using the tag.
"""

from __future__ import annotations

import logging
import re

import reasoning_gym
from math_verify import parse, verify

from ops.config import TaskConfig
from policy.tasks import PerCompletionTask, Problem, reward_function

INSTRUCTION = "Solve the problem. Put only the final answer inside <answer></answer>."
DEMO = [
    {"role": "user", "content": f"What is 7 + 5? {INSTRUCTION}"},
    {"role": "assistant", "content": "7 + 5 = 12\n<answer>12</answer>"},
]
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MAX_ANSWER_CHARS = 64  # a final answer longer than this is not one; it also bounds parsing time
logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we turned its timeouts off


def one_shot(question: str) -> tuple[dict, ...]:
    return (*DEMO, {"role": "user", "content": f"{question} {INSTRUCTION}"})


def final_answer(completion: str) -> tuple[str | None, bool]:
    """(the answer the completion gives, whether it used the tag)."""
    tagged = ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip(), True
    numbers = NUMBER.findall(completion)
    return (numbers[-1] if numbers else None), False


class MathTask(PerCompletionTask):
    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        data = reasoning_gym.create_dataset(
            cfg.dataset, seed=cfg.seed, size=cfg.train_size + cfg.eval_size, **cfg.dataset_args
        )
        problems = [
            Problem(f"{cfg.dataset}-{cfg.seed}-{i}", e["question"], str(e["answer"]), one_shot(e["question"]))
            for i, e in enumerate(data)
        ]
        # a seeded split: the held-out problems are never trained on
        self.train = problems[: cfg.train_size]
        self.held_out = problems[cfg.train_size :]
        self.reward_fn = reward_function(cfg)

    def reward(self, problem: Problem, completion: str) -> float:
        answer, tagged = final_answer(completion)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            return 0.0
        # math-verify's own timeouts use signal.alarm, which only works on the main thread: they are off,
        # and the short answers we pass (MAX_ANSWER_CHARS) keep parsing fast instead
        correct = verify(
            parse(problem.answer, parsing_timeout=None), parse(answer, parsing_timeout=None), timeout_seconds=None
        )
        return float(correct) + (self.cfg.format_bonus if tagged else 0.0)
