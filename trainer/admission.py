"""What the trainer will train on: every curated group is checked against the model before it enters
the replay buffer, so no record can crash a training step.

The filter checks what it can know without the model; only the trainer knows its vocabulary, its
context length and its tokenizer. A group it cannot train on (undecodable, made by another model,
token ids outside the vocabulary, longer than the context, no prompt at all) goes to the dead-letter
topic with the reason, and training goes on. A group without prompt_token_ids but with a prompt is
tokenized as searchers do it: the prompt as one user turn in the model's chat template.
"""

from __future__ import annotations

import logging

import numpy as np

from ops import kafka_clients
from ops.topics import JobTopics
from schemas.records import DeadLetter, TrajectoryGroup

log = logging.getLogger(__name__)


class Admission:
    """admit(group) -> None when the model can train on it (prompt ids filled in if missing), else the reason."""

    def __init__(self, model, tokenizer, model_id: str):
        from policy.models import chat_prompt_ids

        self.tokenizer = tokenizer
        self.model_id = model_id
        self.vocab = model.get_input_embeddings().num_embeddings
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._prompt_ids = lambda text: chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])

    def __call__(self, group: TrajectoryGroup) -> str | None:
        # the filter's checks again: curated may hold groups a filter of an older release let through
        reason = group.empty() or group.foreign_ids(self.model_id)
        if reason:
            return reason
        if group.prompt_token_ids.size == 0:
            if not group.prompt:
                return "no prompt_token_ids and no prompt text to tokenize"
            group.prompt_token_ids = np.array(self._prompt_ids(group.prompt), np.int32)
        for where, ids in (("prompt", group.prompt_token_ids), *((f"sample {i}", s.token_ids) for i, s in
                                                                   enumerate(group.samples))):  # fmt: skip
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
                bad = int(ids.max()) if ids.max() >= self.vocab else int(ids.min())
                return f"{where}: token id {bad} is outside the model's vocabulary of {self.vocab}"
        for i, s in enumerate(group.samples):
            if s.token_ids.size == 0:
                return f"sample {i}: no completion tokens"
            if mismatch := s.logprobs_mismatch():
                return f"sample {i}: {mismatch}"
        longest = group.prompt_token_ids.size + max((s.token_ids.size for s in group.samples), default=0)
        if self.context and longest > self.context:
            return f"prompt + completion is {longest} tokens, past the model's context of {self.context}"
        return None


class DeadLetters:
    """The trainer's rejects, to the dead-letter topic (scorer 'trainer') with the original bytes."""

    def __init__(self, topics: JobTopics):
        self.dlq, self.curated = topics.dlq, topics.curated
        self.producer = kafka_clients.producer(topics.cfg)
        self.sent = 0

    def __call__(self, record, reason: str) -> None:
        log.warning("curated %d:%d not trainable, sent to %s: %s", record.partition, record.offset, self.dlq, reason)
        letter = DeadLetter(reason, "trainer", self.curated.name, record.partition, record.offset, record.key,
                            bytes(record.value or b""))  # fmt: skip
        self.dlq.produce(self.producer, letter, key=record.key)
        self.sent += 1

    def close(self) -> None:
        """Waits on Kafka at most CLOSE_TIMEOUT_S: the trainer's stop must not hang on a dead letter."""
        try:
            self.producer.flush(timeout=kafka_clients.CLOSE_TIMEOUT_S)
        finally:
            self.producer.close(timeout=kafka_clients.CLOSE_TIMEOUT_S)
