"""The synchronous on-policy baseline's batches (trainer.mode: sync): generate, then train on them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ops import kafka_clients
from ops.config import TbaConfig
from ops.errors import TbaError
from trainer.replay_buffer import SampledPrompt

if TYPE_CHECKING:  # for the annotation only: the trainer drives this, not the other way round
    from trainer.train import Trainer

log = logging.getLogger(__name__)


class SyncBatches:
    """The synchronous on-policy baseline: generate a batch with the current weights, then train on it.

    Each generated group is also written to raw, as searchers write theirs, so a synchronous job
    leaves the same history behind (curated after the filter) for inspection and replays.
    """

    def __init__(self, cfg: TbaConfig, trainer: Trainer, tokenizer, task, history: bool = True):
        from ops.job import model_id
        from ops.trajectory_producer import TrajectoryProducer
        from policy.generation import HFGenerator
        from policy.models import frozen_reference

        s, t = cfg.searcher, cfg.trainer
        policy = t.model or s.model  # under LoRA the reference is the policy with its adapters off: one copy
        reference = frozen_reference(trainer.model, s.reference_model or policy, None, t.dtype, policy)
        self.generator = HFGenerator(trainer.model, tokenizer, reference, t.temperature, s.max_new_tokens)
        self.task = task
        self.k = cfg.buffer.samples_per_prompt
        self.b = t.prompts_per_step
        self.rng = np.random.default_rng(t.seed)
        self.trainer = trainer
        self.model_id = model_id(cfg)
        self.producer = TrajectoryProducer(cfg) if history else None

    def __call__(self) -> list[SampledPrompt]:
        from policy.tasks import RewardError, scored_samples, task_label
        from schemas.records import TrajectoryGroup

        self.trainer.model.eval()
        problems = [self.task.train[i] for i in self.rng.choice(len(self.task.train), self.b, replace=False)]
        prompts = [self.generator.prompt_ids(p.messages) for p in problems]
        version = self.trainer.policy_version
        batch = []
        for problem, ids, completions in zip(problems, prompts, self.generator.sample(prompts, self.k), strict=True):
            try:
                samples = scored_samples(self.task, problem, completions)
            except RewardError as exc:  # as a searcher does: this group goes nowhere, the batch goes on
                log.warning("sync batch: group of prompt %s left out: %s", problem.prompt_id, exc)
                continue
            group = TrajectoryGroup(
                prompt_id=problem.prompt_id, task=task_label(self.task.cfg), samples=samples, policy_version=version,
                prompt=self.generator.tokenizer.decode(ids), prompt_token_ids=np.array(ids, np.int32),
                generator_id="trainer-sync", model_id=self.model_id,
            )  # fmt: skip
            if self.producer is not None:
                self.producer.send(group)
            batch.append(SampledPrompt(problem.prompt_id, group.prompt, group.prompt_token_ids, samples,
                                       [version] * len(samples), True))  # fmt: skip
        if self.producer is not None:
            self.producer.flush()
        if not batch:
            raise TbaError("every group of a synchronous batch failed to score (see the warnings above)")
        return batch

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(kafka_clients.CLOSE_TIMEOUT_S)
