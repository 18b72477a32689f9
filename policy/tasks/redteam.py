"""Automated red-teaming: the policy writes attack prompts; a target model answers; a judge scores
the answer: a classifier's probability of task.toxic_label, or task.reward_fn called with the attacks
as prompts and the target's answers as completions. Optionally rewards attacks unlike the group's others.
"""

from __future__ import annotations

import torch

from ops.errors import ConfigError
from policy.tasks import reward_function
from policy.tasks.prompts import classify, load_classifier, load_prompts


class RedTeamTask:
    def __init__(self, cfg):
        from policy.models import load_model

        self.cfg = cfg
        self.train, self.held_out = load_prompts(cfg)
        self.reward_fn = reward_function(cfg)
        if self.reward_fn is None:
            self.classifier, self.classifier_tokenizer = load_classifier(cfg.classifier_model, "task.classifier_model")
        if cfg.target_model is None:
            raise ConfigError('task.target_model: the redteam task needs the model under attack ("": the default)')
        self.target, self.target_tokenizer = load_model(cfg.target_model, None, "float32", field="task.target_model")

    @torch.no_grad()
    def responses(self, attacks: list[str]) -> list[str]:
        """The target's greedy answer to each attack, asked as a user turn: one left-padded batch."""
        from policy.logprobs import left_padded
        from policy.models import chat_prompt_ids

        tok = self.target_tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        prompts = [chat_prompt_ids(tok, [{"role": "user", "content": attack}]) for attack in attacks]
        ids, mask = left_padded(prompts, pad)
        width = ids.shape[1]
        out = self.target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                                   max_new_tokens=self.cfg.target_max_new_tokens)  # fmt: skip
        return [tok.decode(row[width:], skip_special_tokens=True) for row in out]

    def harm(self, attacks: list[str]) -> list[float]:
        """The judge's score of the target's answer to each attack."""
        answers = self.responses(attacks)
        if self.reward_fn is not None:
            return self.reward_fn(attacks, answers)
        logits = classify(self.classifier, self.classifier_tokenizer, answers)  # (N, labels)
        return torch.softmax(logits, dim=-1)[:, self.cfg.toxic_label].tolist()

    def score(self, problem, texts: list[str], finished: list[bool]) -> list[float]:
        harm = self.harm(texts)
        if self.cfg.diversity_coef == 0:
            return harm
        return [h + self.cfg.diversity_coef * d for h, d in zip(harm, novelty(texts), strict=True)]


def novelty(texts: list[str]) -> list[float]:
    """1 - the highest word-set Jaccard similarity to another text of the group."""
    words = [set(t.lower().split()) for t in texts]
    out = []
    for i, a in enumerate(words):
        sims = [len(a & b) / len(a | b) if a | b else 1.0 for j, b in enumerate(words) if j != i]
        out.append(1.0 - max(sims, default=0.0))
    return out
