"""The TB trainer: whole prompt groups from the ReplayBuffer -> TB loss -> AdamW -> a new policy version every k steps.

One step: sample B prompts x K samples (TBA sampling), score each sample's log-probability under
the current policy at the sampling temperature, take the TB loss against the reference log-probs
that travelled in the record, in micro-batches of whole prompts with gradient accumulation.
Checkpoints hold everything a resume needs: weights (safetensors, loadable by from_pretrained),
optimizer, scheduler, RNG, step, policy version, consumed offsets and the buffer index.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ops.config import TbaConfig
from ops.errors import TbaError
from ops.metrics import STALENESS_BOUND
from policy.logprobs import completion_logits, padded, token_logprobs
from trainer import checkpoint
from trainer.baselines import grpo_loss, penalised_rewards, rloo_loss
from trainer.replay_buffer import ReplayBuffer, SampledPrompt
from trainer.tb_loss import linear_beta, tb_loss

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float
    beta: float
    mean_reward: float
    on_policy_fraction: float
    staleness: float  # mean policy versions between the samples and the model trained
    replay_ratio: float  # prompts trained per group received, since the trainer started
    seconds: float


def collate(prompts: list[SampledPrompt], pad_id: int):
    """Left-padded prompts and right-padded completions of whole prompts.

    Returns prompts and their mask (n_prompts, W), completion ids and mask (n_prompts * K, T), and the
    reference log-probs and rewards as (n_prompts, K).
    """
    samples = [s for p in prompts for s in p.samples]
    heads = [p.prompt_token_ids.tolist() for p in prompts]
    head, head_mask, tail, tail_mask = padded(heads, [s.token_ids for s in samples], pad_id)
    k = len(prompts[0].samples)
    ref = torch.tensor([float(s.ref_logprobs.sum()) for s in samples]).view(len(prompts), k)  # (P, K)
    rewards = torch.tensor([float(s.reward) for s in samples]).view(len(prompts), k)  # (P, K)
    return head, head_mask, tail, tail_mask.float(), ref, rewards


class Trainer:
    def __init__(self, cfg: TbaConfig, model, buffer: ReplayBuffer | None, pad_id: int, server=None, feed=None):
        self.cfg = cfg
        self.t = cfg.trainer
        self.model = model
        self.buffer = buffer
        self.pad_id = pad_id
        self.server = server  # a WeightSyncServer, when weights are published
        self.feed = feed  # a CuratedFeed, when training live
        self.rejects = None  # trainer.admission.DeadLetters: where groups it cannot train on go
        self.replay: dict | None = None  # a replay's range and init, recorded in its checkpoints
        self.step = 0
        self.policy_version = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)
        warmup = max(1, self.t.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.waited_s = 0.0
        self.trained_prompts = 0  # since this process started, as buffer.received counts groups
        # trained samples by policy versions behind, those over STALENESS_BOUND counted as one more: a key per
        # distinct value would grow with the job (samples from the whole history), and /metrics reads them all
        self.staleness_counts: Counter[int] = Counter()
        self.staleness_sum = 0
        self.last: dict[str, dict] = {}  # the last metrics row of each kind ("train", "eval")
        # data parallel under torchrun: each process takes every world-th prompt of the batch
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.forward_model = DistributedDataParallel(model) if self.world > 1 else model
        self.device = next(model.parameters()).device

    @property
    def replay_ratio(self) -> float:
        return self.trained_prompts / max(1, self.buffer.received) if self.buffer is not None else 0.0

    def held_by_replay_bound(self) -> bool:
        """Would the next step train the groups received so far more often than buffer.max_replay_ratio allows?
        Only while groups still arrive (a replay without --live trains its range as often as it is told)."""
        bound = self.cfg.buffer.max_replay_ratio
        next_total = self.trained_prompts + self.t.prompts_per_step
        return self.feed is not None and bound > 0 and next_total > bound * self.buffer.received

    @property
    def ready(self) -> bool:
        """Has what a step needs: enough prompts, within the replay bound (a stall check reads it)."""
        enough = self.buffer is not None and self.buffer.num_prompts >= self.t.min_buffer_prompts
        return enough and not self.held_by_replay_bound()

    def wait_for_data(self, stop: threading.Event | None = None) -> None:
        """Ingest from the feed until the buffer holds min_buffer_prompts prompts and the replay bound allows a
        step."""
        start = time.monotonic()
        while not self.ready and not (stop and stop.is_set()):
            if self.feed is None:
                raise TbaError(
                    f"the replay buffer holds {self.buffer.num_prompts} prompts, fewer than "
                    f"trainer.min_buffer_prompts ({self.t.min_buffer_prompts}), and nothing more will arrive"
                )
            self.feed.poll(200)
        self.waited_s += time.monotonic() - start

    def broadcast(self, batch: list[SampledPrompt] | None) -> list[SampledPrompt] | None:
        """Process 0's batch (or None: stop) to every process."""
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def train_step(self, batch: list[SampledPrompt] | None = None) -> StepResult:
        """One optimizer step on batch (default: B prompts sampled from the replay buffer).

        Under DDP every process is given the same batch and trains on its share of the prompts;
        averaging the gradients makes it the same update as one process on the whole batch.
        """
        start = time.monotonic()
        self.model.train()
        if batch is None:
            batch = self.buffer.sample(self.t.prompts_per_step)
        if len(batch) % self.world:
            raise TbaError(f"trainer.prompts_per_step ({len(batch)}) must be divisible by the {self.world} processes")
        local = batch[self.rank :: self.world]
        beta = linear_beta(self.step, self.t.beta_start, self.t.beta_end, self.t.beta_anneal_steps)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        micros = range(0, len(local), self.t.micro_batch_prompts)
        for i in micros:
            micro = local[i : i + self.t.micro_batch_prompts]  # whole prompts: logZ never mixes prompts
            last = i == micros[-1]
            with self.forward_model.no_sync() if self.world > 1 and not last else contextlib.nullcontext():
                head, head_mask, ids, mask, ref, rewards = (x.to(self.device) for x in collate(micro, self.pad_id))
                logits = completion_logits(self.forward_model, head, head_mask, ids, mask)  # (N, T, V)
                token_logp = token_logprobs(logits, ids, self.t.temperature) * mask  # (N, T)
                logp = token_logp.sum(-1).view_as(ref)  # (P, K)
                loss = self._loss(logp, token_logp, mask, ref, rewards, beta) * len(micro) / len(local)
                loss.backward()
            total += loss.detach()
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        # staleness: versions between each sample's policy and the one this batch was trained with
        # (the version these weights were before the step: a publish below makes the next one)
        staleness = [self.policy_version - v for p in batch for v in p.policy_versions]
        self.staleness_counts.update(min(s, STALENESS_BOUND + 1) for s in staleness)
        self.staleness_sum += sum(staleness)
        self.trained_prompts += len(batch)
        self.step += 1
        if self.server is not None and self.step % self.t.sync_every == 0:
            self.publish()
        return StepResult(
            step=self.step,
            loss=float(total),
            beta=beta,
            mean_reward=float(np.mean([s.reward for p in batch for s in p.samples])),
            on_policy_fraction=float(np.mean([p.on_policy for p in batch])),
            staleness=float(np.mean(staleness)),
            replay_ratio=self.replay_ratio,
            seconds=time.monotonic() - start,
        )

    def _loss(self, logp, token_logp, mask, ref, rewards, beta) -> torch.Tensor:
        if self.t.loss == "tb":
            return tb_loss(logp, ref, rewards, beta)
        rewards = penalised_rewards(rewards, logp, ref, self.t.kl_coef)
        if self.t.loss == "rloo":
            return rloo_loss(logp, rewards)
        shape = (*ref.shape, -1)  # (P, K, T)
        return grpo_loss(token_logp.view(shape), mask.view(shape), rewards)

    def published_state(self) -> dict[str, torch.Tensor]:
        """What searchers need: every weight, or with LoRA only the trainable adapters."""
        if self.t.lora_r:
            return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        return self.model.state_dict()

    def publish(self) -> int:
        """A new policy version from the current weights (the server copies them and returns)."""
        self.policy_version += 1
        self.server.publish(self.published_state(), step=self.step, version=self.policy_version)
        return self.policy_version

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self.buffer is not None:
            self.buffer.close()
        if self.rejects is not None:
            self.rejects.close()

    # -- checkpoints (trainer/checkpoint.py) ------------------------------------------------------------

    def save(self) -> Path:
        return checkpoint.save(self)

    def load_weights(self, path: Path) -> None:
        checkpoint.load_weights(self, path)

    def resume(self) -> bool:
        return checkpoint.resume(self)
