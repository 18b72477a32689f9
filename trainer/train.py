"""The TB trainer: whole prompt groups from the ReplayBuffer -> TB loss -> AdamW -> a new policy version every k steps.

One step: sample B prompts x K samples (TBA sampling), score each sample's log-probability under
the current policy at the sampling temperature, take the TB loss against the reference log-probs
that travelled in the record, in micro-batches of whole prompts with gradient accumulation.
Checkpoints hold everything a resume needs: weights (safetensors, loadable by from_pretrained),
optimizer, scheduler, RNG, step, policy version, consumed offsets and the buffer index.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from ops.config import TbaConfig, with_overrides
from ops.errors import TbaError
from producers.tasks import RewardError, checked_rewards
from trainer.baselines import grpo_loss, penalised_rewards, rloo_loss
from trainer.replay_buffer import ReplayBuffer, SampledPrompt
from trainer.tb_loss import completion_logits, linear_beta, tb_loss, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float
    beta: float
    mean_reward: float
    on_policy_fraction: float
    staleness: float  # mean policy versions between the samples and the model trained
    seconds: float


def apply_lora(model, t):
    """Wrap model with LoRA adapters per trainer config (searchers do the same, so names match)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=0.0, target_modules=list(t.lora_targets))
    return get_peft_model(model, config)


def collate(prompts: list[SampledPrompt], pad_id: int):
    """Left-padded prompts and right-padded completions of whole prompts.

    Returns prompts and their mask (n_prompts, W), completion ids and mask (n_prompts * K, T), and the
    reference log-probs and rewards as (n_prompts, K).
    """
    width = max(p.prompt_token_ids.size for p in prompts)
    length = max(s.token_ids.size for p in prompts for s in p.samples)
    heads = [p.prompt_token_ids.tolist() for p in prompts]
    head = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in heads])
    head_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in heads])
    samples = [s for p in prompts for s in p.samples]
    tail = torch.tensor([s.token_ids.tolist() + [pad_id] * (length - s.token_ids.size) for s in samples])
    tail_mask = torch.tensor([[1.0] * s.token_ids.size + [0.0] * (length - s.token_ids.size) for s in samples])
    k = len(prompts[0].samples)
    ref = torch.tensor([float(s.ref_logprobs.sum()) for s in samples]).view(len(prompts), k)  # (P, K)
    rewards = torch.tensor([float(s.reward) for s in samples]).view(len(prompts), k)  # (P, K)
    return head, head_mask, tail, tail_mask, ref, rewards


def latest_checkpoint(run_dir: Path) -> Path | None:
    """run_dir's newest checkpoint folder (checkpoints/step-NNNNNN), or None."""
    latest = run_dir / "checkpoints" / "latest"
    return latest.parent / latest.read_text().strip() if latest.exists() else None


def checkpoint_at(path: str | Path) -> Path:
    """A checkpoint folder named directly, or the newest of a run dir; a clear error if neither."""
    path = Path(path)
    if (path / "model").is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise TbaError(f"{path} is neither a checkpoint (<run_dir>/checkpoints/step-N) nor a run dir holding one")
    return found


def check_replay_run_dir(run_dir: Path, replay: dict) -> None:
    """A replay trains a new policy in a run dir of its own: empty, or holding this same replay (it resumes).

    Another job's checkpoint there is an error rather than a silent resume of that job.
    """
    marker = run_dir / "replay.json"
    if latest_checkpoint(run_dir) is None or (marker.exists() and json.loads(marker.read_text()) == replay):
        return
    raise TbaError(
        f"trainer.run_dir {run_dir} holds a checkpoint of another job; a replay trains a new policy in a run dir "
        f"of its own (e.g. TBA__TRAINER__RUN_DIR=.tba/replay; --init to start from that checkpoint)"
    )


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
        self.step = 0
        self.policy_version = 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)
        warmup = max(1, self.t.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.waited_s = 0.0
        self.staleness_counts: Counter[int] = Counter()  # trained samples by policy versions behind
        self.last: dict[str, dict] = {}  # the last metrics row of each kind ("train", "eval")
        # data parallel under torchrun: each process takes every world-th prompt of the batch
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.forward_model = DistributedDataParallel(model) if self.world > 1 else model
        self.device = next(model.parameters()).device

    def wait_for_data(self, stop: threading.Event | None = None) -> None:
        """Ingest from the feed until the buffer holds min_buffer_prompts prompts."""
        start = time.monotonic()
        while self.buffer.num_prompts < self.t.min_buffer_prompts and not (stop and stop.is_set()):
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
        self.staleness_counts.update(staleness)
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

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write a checkpoint under run_dir/checkpoints/step-NNNNNN (atomically) and point `latest` at it."""
        root = Path(self.t.run_dir) / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp / "model", safe_serialization=True)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "step": self.step,
                "policy_version": self.policy_version,
            },
            tmp / "trainer.pt",
        )
        if self.buffer is not None:
            np.savez(tmp / "buffer.npz", **self.buffer.state())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        return final

    def load_weights(self, path: Path) -> None:
        """The weights of the checkpoint at path (the adapters alone under LoRA), none of its other state."""
        weights = load_file(next((path / "model").glob("*.safetensors")))
        if self.t.lora_r:  # save_pretrained of a peft model writes the adapters alone, in peft's naming
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, weights)
        else:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
                raise TbaError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")

    def resume(self) -> bool:
        """Load the latest checkpoint of run_dir, if there is one; True if resumed."""
        path = latest_checkpoint(Path(self.t.run_dir))
        if path is None:
            return False
        self.load_weights(path)
        state = torch.load(path / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.policy_version = state["step"], state["policy_version"]
        if self.buffer is not None:
            with np.load(path / "buffer.npz", allow_pickle=True) as saved:
                self.buffer.restore({k: saved[k] for k in saved.files})
        if self.feed is not None:
            self.feed.seek(self.buffer.next_offsets)
        log.info("resumed from %s at step %d, policy version %d", path, self.step, self.policy_version)
        return True


class Evaluator:
    """Held-out evaluation: greedy accuracy (reward >= 1) and mean reward of one sample at the temperature."""

    def __init__(self, cfg: TbaConfig, task, tokenizer):
        from producers.generation import HFGenerator

        self.problems = task.held_out[: cfg.trainer.eval_prompts]
        self.task = task
        self.tokenizer = tokenizer
        self._gen = lambda model: HFGenerator(
            model, tokenizer, None, cfg.trainer.temperature, cfg.trainer.eval_max_new_tokens
        )

    def _score(self, texts: list[str], finished: list[bool]) -> list[float]:
        rewards = []
        for problem, text, done in zip(self.problems, texts, finished, strict=True):
            try:
                (reward,) = checked_rewards(self.task.score(problem, [text], [done]), 1, f"task {self.task.cfg.name!r}")
            except RewardError as exc:  # as a searcher would: this one goes unscored, the others count
                log.warning("evaluation of %s: %s", problem.prompt_id, exc)
                continue
            rewards.append(reward)
        return rewards

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        gen = self._gen(model)
        prompts = [gen.prompt_ids(p.messages) for p in self.problems]
        greedy, sampled = (self._score(*gen.texts(prompts, sample=mode)) for mode in (False, True))
        mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        return {"greedy_accuracy": mean([r >= 1.0 for r in greedy]), "greedy_reward": mean(greedy),
                "sampled_reward": mean(sampled)}  # fmt: skip


def run_trainer(
    cfg: TbaConfig,
    stop: threading.Event | None = None,
    replay: dict | None = None,
    live: bool = True,
    metrics_port: int | None = None,
    init: Path | None = None,
    history: bool = True,
) -> Trainer:
    """`tba train`: the training job, asynchronous (TBA: from the curated topic) or synchronous on-policy.

    replay: a past range of the curated topic to ingest first (CuratedFeed.fill's arguments); with
    live=False nothing else is read, so the job retrains from history alone (`tba replay`), in a
    run_dir of its own, starting from the model or from the weights of the checkpoint `init`.
    Resumes from run_dir's latest checkpoint, checkpoints every checkpoint_every steps and on stop,
    evaluates on the held-out problems, and appends every step's metrics to run_dir/metrics.jsonl
    (and serves them on http://127.0.0.1:metrics_port/metrics when given). history=False: a
    synchronous job writes no groups to raw (it then needs no Kafka at all).
    """
    from ops.job import model_id
    from producers.generation import load_model
    from producers.tasks import build_task
    from schemas.codec import SchemaStore
    from trainer.admission import Admission, DeadLetters
    from trainer.replay_buffer import CuratedFeed
    from trainer.weight_sync import WeightSyncServer

    stop = stop or threading.Event()
    if replay is not None:  # history is trained on from the replay buffer, whatever mode made it
        cfg = with_overrides(cfg, trainer={"mode": "async"})
    t = cfg.trainer
    marker = {"range": replay, "init": str(init) if init else None}
    if replay is not None:
        check_replay_run_dir(Path(t.run_dir), marker)  # before anything loads
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main = not dist.is_initialized() or dist.get_rank() == 0
    torch.manual_seed(t.seed)  # the same initial weights in every process
    model, tokenizer = load_model(t.model or cfg.searcher.model, t.gguf_file or cfg.searcher.gguf_file, t.dtype,
                                  field="trainer.model" if t.model else "searcher.model")  # fmt: skip
    if torch.cuda.is_available():  # one GPU per process (torchrun sets LOCAL_RANK)
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    if t.lora_r:
        model = apply_lora(model, t)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = build_task(cfg.task)
    if t.mode == "sync":
        trainer = Trainer(cfg, model, None, pad)
        trainer.resume()
        batches = SyncBatches(cfg, trainer, tokenizer, task, history) if main else None
        try:
            return _loop(cfg, trainer, batches, Evaluator(cfg, task, tokenizer), stop, metrics_port)
        finally:
            if batches is not None:
                batches.close()
    if not main:  # the other processes only train on the batches process 0 sends them
        trainer = Trainer(cfg, model, None, pad)
        trainer.resume()
        return _loop(cfg, trainer, None, Evaluator(cfg, task, tokenizer), stop, metrics_port)
    store = SchemaStore(cfg)
    rejects = DeadLetters(cfg, store)
    admit = Admission(model, tokenizer, model_id(cfg))
    buffer = ReplayBuffer(cfg, store, seed=t.seed, admit=admit, reject=rejects)
    server = WeightSyncServer(cfg)
    server.start()
    trainer = Trainer(cfg, model, buffer, pad, server=server, feed=CuratedFeed(cfg, buffer))
    trainer.rejects = rejects
    resumed = trainer.resume()
    if replay is not None and not resumed:
        if init is not None:
            trainer.load_weights(init)
        added = trainer.feed.fill(**replay, stop_event=stop)
        log.info("replay: %d groups of %d prompts from %s", added, buffer.num_prompts, replay)
        too_few = not live and buffer.num_prompts < t.min_buffer_prompts
        if stop.is_set() or too_few:  # nothing trained, nothing written: a corrected replay starts afresh
            trainer.close()
            server.stop()
            if too_few:
                raise TbaError(
                    f"the replayed range of {buffer.topic} holds {buffer.num_prompts} prompts, fewer than "
                    f"trainer.min_buffer_prompts ({t.min_buffer_prompts}), and nothing more will arrive (no --live)"
                )
            return trainer
        Path(t.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(t.run_dir) / "replay.json").write_text(json.dumps(marker))  # a restart resumes this replay
    if not live:
        trainer.feed.close()
        trainer.feed = None
    # what searchers start from (the initial policy, or the resumed one)
    server.publish(trainer.published_state(), step=trainer.step, version=trainer.policy_version)

    def from_buffer() -> list[SampledPrompt] | None:
        if trainer.feed is not None:
            trainer.feed.poll(0)
        trainer.wait_for_data(stop)
        return None if stop.is_set() else buffer.sample(t.prompts_per_step)

    try:
        return _loop(cfg, trainer, from_buffer, Evaluator(cfg, task, tokenizer), stop, metrics_port)
    finally:
        server.stop()


class SyncBatches:
    """The synchronous on-policy baseline: generate a batch with the current weights, then train on it.

    Each generated group is also written to raw, as searchers write theirs, so a synchronous job
    leaves the same history behind (curated after the filter) for inspection and replays.
    """

    def __init__(self, cfg: TbaConfig, trainer: Trainer, tokenizer, task, history: bool = True):
        from ops.job import model_id
        from producers.generation import HFGenerator, load_model
        from producers.trajectory_producer import TrajectoryProducer

        s, t = cfg.searcher, cfg.trainer
        reference, _ = load_model(s.reference_model or t.model or s.model, None, t.dtype)
        self.generator = HFGenerator(trainer.model, tokenizer, reference, t.temperature, s.max_new_tokens)
        self.task = task
        self.k = cfg.buffer.samples_per_prompt
        self.b = t.prompts_per_step
        self.rng = np.random.default_rng(t.seed)
        self.trainer = trainer
        self.model_id = model_id(cfg)
        self.producer = TrajectoryProducer(cfg) if history else None

    def __call__(self) -> list[SampledPrompt]:
        from producers.tasks import RewardError, scored_samples, task_label
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
            self.producer.close()


def _loop(
    cfg: TbaConfig, trainer: Trainer, next_batch, evaluate: Evaluator, stop: threading.Event, metrics_port=None
) -> Trainer:
    from ops.metrics import metrics_served, trainer_metrics

    t = cfg.trainer
    main = trainer.rank == 0  # under DDP, process 0 samples, evaluates, records and checkpoints
    Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    metrics = open(Path(t.run_dir) / "metrics.jsonl", "a") if main else None
    started = time.monotonic()

    def record(kind: str, **values) -> None:
        if not main:
            return
        row = {"kind": kind, "mode": t.mode, "loss_name": t.loss, "step": trainer.step,
               "policy_version": trainer.policy_version, "time": time.time(), "wall_s": time.monotonic() - started,
               **values}  # fmt: skip
        trainer.last[kind] = row
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        log.info("%s", row)

    try:
        with metrics_served(metrics_port if main else None, lambda: trainer_metrics(trainer)):
            if trainer.step == 0 and main:
                record("eval", **evaluate(trainer.model))
            elif main:  # resumed from a checkpoint: say where, so a restart can be checked against it
                record("resume", buffer_groups=len(trainer.buffer) if trainer.buffer is not None else 0)
            while trainer.step < t.max_steps:
                fetch = time.monotonic()
                batch = next_batch() if main and not stop.is_set() else None
                if trainer.world > 1:
                    batch = trainer.broadcast(batch)
                if batch is None:
                    break
                fetch_s = time.monotonic() - fetch
                result = trainer.train_step(batch)
                record("train", **{k: v for k, v in result.__dict__.items() if k != "step"}, batch_s=fetch_s,
                       trainer_wait_fraction=trainer.waited_s / (time.monotonic() - started))  # fmt: skip
                if trainer.step % t.eval_every == 0 and main:
                    record("eval", **evaluate(trainer.model))
                if trainer.step % t.checkpoint_every == 0 and main:
                    trainer.save()
    finally:
        if main:
            trainer.save()
            metrics.close()
        trainer.close()
    return trainer
