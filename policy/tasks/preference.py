"""Preference tuning (the paper's TL;DR setting): a reward model scores prompt + completion.

The reward is a local sequence-classification model (task.reward_model) or any function
(task.reward_fn, e.g. policy.tasks.judges:positive_sentiment). A completion that never ends (no
EOS within max_new_tokens) gets no_eos_penalty instead, as in the paper's summarisation runs, so the
policy cannot win by rambling.
"""

from __future__ import annotations

from policy.tasks import reward_function
from policy.tasks.prompts import classify, load_classifier, load_prompts


class PreferenceTask:
    def __init__(self, cfg):
        self.cfg = cfg
        self.train, self.held_out = load_prompts(cfg)
        self.reward_fn = reward_function(cfg)
        if self.reward_fn is None:
            self.model, self.tokenizer = load_classifier(cfg.reward_model, "task.reward_model")

    def score(self, problem, texts: list[str], finished: list[bool]) -> list[float]:
        if self.reward_fn is not None:
            scores = self.reward_fn([problem.question] * len(texts), texts)
        else:
            logits = classify(self.model, self.tokenizer, [f"{problem.question}\n{t}" for t in texts])  # (N, 1)
            scores = logits[:, 0].tolist()
        return [s if done else self.cfg.no_eos_penalty for s, done in zip(scores, finished, strict=True)]
