"""Completing a text-only group: what a generator that speaks text cannot supply, computed with the job's
own tokenizer, chat template and reference model.

TB is off-policy: it trains on any completion as long as it has the completion's token ids and their
reference log-probs (the loss's log pi_ref term). An agent, another model or a person has neither, so
the filter fills them in once, before the group reaches curated: the buffer and every later replay
read the completed group and never recompute it. Behaviour log-probs are left as they came (TB
needs none); given without token ids they cannot be aligned to ours, and the group is refused.
"""

from __future__ import annotations

import numpy as np

from policy.logprobs import completions_token_logprobs
from policy.models import chat_prompt_ids
from schemas.records import TrajectoryGroup


class GroupCompleter:
    """complete(group) fills prompt ids, completion ids and reference log-probs in place; returns None,
    or the reason the group cannot be completed."""

    def __init__(self, reference, tokenizer, temperature: float, rows: int = 8):
        self.reference = reference
        self.rows = rows  # completions per reference pass: bounds the logits' memory for large groups
        self.context = getattr(reference.config, "max_position_embeddings", None)
        self.tokenizer = tokenizer
        self.temperature = temperature  # the loss's: reference log-probs are compared at it
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def complete(self, group: TrajectoryGroup) -> str | None:
        if group.prompt_token_ids.size == 0:
            messages = group.messages or ([{"role": "user", "content": group.prompt}] if group.prompt else [])
            if not messages:
                return "no prompt: neither prompt_token_ids, messages nor prompt"
            group.prompt_token_ids = np.array(chat_prompt_ids(self.tokenizer, messages), np.int32)
            group.prompt = group.prompt or self.tokenizer.decode(group.prompt_token_ids)
        for i, s in enumerate(group.samples):
            if s.token_ids.size == 0 and s.completion:
                if s.logprobs.size:
                    return f"sample {i}: {s.logprobs.size} logprobs but no token_ids to align them with"
                ids = self.tokenizer(s.completion, add_special_tokens=False)["input_ids"]
                s.token_ids = np.array(ids + ([self.eos_id] if s.finish_reason == "stop" else []), np.int32)
        todo = [s for s in group.samples if s.ref_logprobs.size == 0 and s.token_ids.size]
        longest = group.prompt_token_ids.size + max((s.token_ids.size for s in todo), default=0)
        if self.context and longest > self.context:
            return f"prompt + completion is {longest} tokens, past the reference model's context of {self.context}"
        for start in range(0, len(todo), self.rows):  # (rows, T, V) logits at a time, not (K, T, V)
            chunk = todo[start : start + self.rows]
            for s, ref in zip(chunk, self.reference_logprobs(group.prompt_token_ids, [s.token_ids for s in chunk]),
                              strict=True):  # fmt: skip
                s.ref_logprobs = ref
        return None

    def reference_logprobs(self, prompt: np.ndarray, completions: list[np.ndarray]) -> list[np.ndarray]:
        """The reference's log-prob of each completion token at the temperature: one pass, the prompt once."""
        return completions_token_logprobs(self.reference, [prompt.tolist()], completions, self.pad_id, self.temperature)
