"""`tba train` and `tba replay`: the training job wired from config, and its loop of steps, evaluations,
metrics rows and checkpoints."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ops.config import TbaConfig, with_overrides
from ops.errors import TbaError
from trainer.checkpoint import check_resume
from trainer.evaluation import Evaluator
from trainer.replay_buffer import SampledPrompt
from trainer.sync_baseline import SyncBatches
from trainer.train import Trainer

log = logging.getLogger(__name__)


def trained_model(cfg: TbaConfig):
    """(model, tokenizer, pad id) of the policy the trainer trains: the base model, with adapters under LoRA."""
    from policy.models import apply_lora, load_model

    t = cfg.trainer
    model, tokenizer = load_model(t.model or cfg.searcher.model, t.gguf_file or cfg.searcher.gguf_file, t.dtype,
                                  field="trainer.model" if t.model else "searcher.model")  # fmt: skip
    if torch.cuda.is_available():  # one GPU per process (torchrun sets LOCAL_RANK)
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    if t.lora_r:
        model = apply_lora(model, t)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, pad


def checkpoint_policy(cfg: TbaConfig) -> tuple[Trainer, object]:
    """(trainer, tokenizer) resumed from run_dir's latest checkpoint: the policy a job stopped with."""
    model, tokenizer, pad = trained_model(cfg)
    trainer = Trainer(cfg, model, None, pad)
    if not trainer.resume():
        raise TbaError(f"no checkpoint in {cfg.trainer.run_dir} to evaluate")
    return trainer, tokenizer


def evaluate_at_stop(cfg: TbaConfig) -> dict | None:
    """Evaluate the checkpoint a job stopped with on the held-out problems, and append it to run_dir/metrics.jsonl
    as its last evaluation (what `tba report` compares with the first); None when the trainer's last evaluation
    was already of that step. Without it a job stopped by its budget reports the last eval_every step."""
    from ops.metrics import MetricsLog, metric_rows
    from policy.tasks import build_task

    rows = metric_rows(Path(cfg.trainer.run_dir))
    evals = [r for r in rows if r["kind"] == "eval"]
    if not rows or (evals and evals[-1]["step"] == rows[-1]["step"]):  # the trainer saves as it stops
        return None
    trainer, tokenizer = checkpoint_policy(cfg)
    log.info("evaluating the checkpoint of step %d on %d held-out problems", trainer.step, cfg.trainer.eval_prompts)
    result = Evaluator(cfg, build_task(cfg.task), tokenizer)(trainer.model)
    last, now = rows[-1], time.time()
    row = {"kind": "eval", "mode": cfg.trainer.mode, "loss_name": cfg.trainer.loss, "step": trainer.step,
           "policy_version": trainer.policy_version, "time": now, "wall_s": last["wall_s"] + now - last["time"],
           "at_stop": True, **result}  # fmt: skip
    metrics = MetricsLog(Path(cfg.trainer.run_dir), cfg.trainer.metrics_max_mb, cfg.trainer.metrics_backups)
    metrics.write(row)
    metrics.close()
    return row


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
    from ops.topics import JobTopics
    from policy.tasks import build_task
    from trainer.admission import Admission, DeadLetters
    from trainer.curated_feed import CuratedFeed, curated_buffer
    from trainer.weight_sync import WeightSyncServer

    stop = stop or threading.Event()
    if replay is not None:  # history is trained on from the replay buffer, whatever mode made it
        cfg = with_overrides(cfg, trainer={"mode": "async"})
    t = cfg.trainer
    marker = {"range": replay, "init": str(init) if init else None} if replay is not None else None
    check_resume(cfg, marker)  # before anything loads: this run dir's checkpoint is this job's, or none
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main = not dist.is_initialized() or dist.get_rank() == 0
    torch.manual_seed(t.seed)  # the same initial weights in every process
    model, tokenizer, pad = trained_model(cfg)
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
    topics = JobTopics(cfg)
    rejects = DeadLetters(topics)
    admit = Admission(model, tokenizer, model_id(cfg))
    buffer = curated_buffer(cfg, topics.curated, seed=t.seed, admit=admit, reject=rejects)
    server = WeightSyncServer(cfg)
    server.start()
    trainer = Trainer(cfg, model, buffer, pad, server=server, feed=CuratedFeed(cfg, buffer))
    trainer.replay = marker  # its checkpoints record it: a restart resumes this replay, no other
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
    if not live:
        trainer.feed.close()
        trainer.feed = None
    # what searchers start from (the initial policy, or the resumed one)
    server.publish(trainer.published_state(), step=trainer.step, version=trainer.policy_version)

    pending = None

    def from_buffer() -> list[SampledPrompt] | None:
        nonlocal pending
        if trainer.feed is not None:
            trainer.feed.poll(0)
        trainer.wait_for_data(stop)
        if stop.is_set():
            return None
        batch = pending.result() if pending is not None else buffer.sample(t.prompts_per_step)
        if cfg.buffer.prefetch:  # the next step's batch: drawn now, read back from Kafka while this one trains
            pending = buffer.prefetch(t.prompts_per_step)
        return batch

    try:
        return _loop(cfg, trainer, from_buffer, Evaluator(cfg, task, tokenizer), stop, metrics_port)
    finally:
        server.stop()


def _loop(
    cfg: TbaConfig, trainer: Trainer, next_batch, evaluate: Evaluator, stop: threading.Event, metrics_port=None
) -> Trainer:
    from ops.metrics import MetricsLog, metrics_served, trainer_metrics

    t = cfg.trainer
    main = trainer.rank == 0  # under DDP, process 0 samples, evaluates, records and checkpoints
    Path(t.run_dir).mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(Path(t.run_dir), t.metrics_max_mb, t.metrics_backups) if main else None
    started = time.monotonic()

    def record(kind: str, **values) -> None:
        if not main:
            return
        row = {"kind": kind, "mode": t.mode, "loss_name": t.loss, "step": trainer.step,
               "policy_version": trainer.policy_version, "time": time.time(), "wall_s": time.monotonic() - started,
               **values}  # fmt: skip
        trainer.last[kind] = row
        metrics.write(row)
        log.info("%s", row)

    def record_eval() -> None:
        evaluated = evaluate(trainer.model, stop)  # None: given up for a stop, which the checkpoint must not wait for
        if evaluated is not None:
            record("eval", **evaluated)

    try:
        with metrics_served(metrics_port if main else None, lambda: trainer_metrics(trainer)):
            if trainer.step == 0 and main:
                record_eval()
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
                unreadable = len(trainer.buffer.unreadable) if trainer.buffer is not None else 0
                record("train", **{k: v for k, v in result.__dict__.items() if k != "step"}, batch_s=fetch_s,
                       trainer_wait_fraction=trainer.waited_s / (time.monotonic() - started),
                       unreadable_groups=unreadable)  # fmt: skip
                if trainer.step % t.eval_every == 0 and main:
                    record_eval()
                if trainer.step % t.checkpoint_every == 0 and main:
                    trainer.save()
    finally:
        if main:
            trainer.save()
            metrics.close()
        trainer.close()
    return trainer
