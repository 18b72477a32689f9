"""Searcher: sample completions of its share of the prompts with the current policy, reward them,
publish one TrajectoryGroup per prompt, and swap in new weights between batches.

Searchers never wait for the trainer. Their share of the prompts is what the searchers' consumer
group over the prompts topic gives them (producers/prompt_feed.py): searchers join and leave a
running job freely, and a searcher commits the prompts it took only once their groups are acked in
raw (a prompt's groups stay on one raw partition, keyed by prompt_id).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ops import kafka_clients
from ops.config import TbaConfig
from ops.topics import JobTopics
from ops.trajectory_producer import TrajectoryProducer
from policy.generation import HFGenerator
from policy.tasks import RewardError, scored_samples, task_label
from producers.generators import build_generator, swap_in_newest, weight_subscriber
from producers.policy_watch import PolicyWatch
from producers.prompt_feed import PromptFeed, seed_prompts
from producers.weight_subscriber import WeightSubscriber
from schemas.records import TrajectoryGroup

log = logging.getLogger(__name__)


@dataclass
class SearcherStats:
    batches: int = 0
    groups: int = 0
    samples: int = 0
    tokens: int = 0  # completion tokens
    swaps: int = 0
    paused: int = 0  # batches skipped for being more than max_policy_lag versions behind
    unscored: int = 0  # groups not sent because their reward could not be computed
    idle: int = 0  # looks for prompts that found none (no prompts partition held): alive, with nothing to do
    mean_reward: float = 0.0


class Searcher:
    def __init__(
        self,
        cfg: TbaConfig,
        index: int,
        generator: HFGenerator,
        task,
        producer: TrajectoryProducer,
        feed: PromptFeed,
        subscriber: WeightSubscriber | None = None,
        model_id: str = "",
        watch=None,
    ):
        self.cfg = cfg.searcher
        self.index = index
        self.generator = generator
        self.task = task
        self.producer = producer
        self.feed = feed
        self.subscriber = subscriber
        self.model_id = model_id
        self.watch = watch  # a PolicyWatch: how far behind the trainer this searcher's weights are
        self.generator_id = f"searcher-{index}"
        self.policy_version = 0  # the initial weights are version 0; the trainer publishes from there
        self.stats = SearcherStats()

    def swap_weights(self) -> bool:
        """Load the newest received version, if any (between batches only)."""
        version = swap_in_newest(self.subscriber, self.generator)
        if version is None:
            return False
        self.policy_version = version
        self.stats.swaps += 1
        return True

    def lagging(self) -> int:
        """How many versions beyond max_policy_lag this searcher is behind (0: fine to generate)."""
        if self.watch is None:
            return 0
        return max(0, self.watch.poll() - self.policy_version - self.cfg.max_policy_lag)

    def step(self) -> list[TrajectoryGroup]:
        """One batch: swap weights if new ones arrived, sample, reward, publish, commit the prompts taken.
        [] while paused for lag or while this searcher holds no prompts partition."""
        self.swap_weights()
        if self.lagging():
            if self.stats.paused % 30 == 0:
                log.warning(
                    "searcher %d paused: policy version %d is more than %d behind the newest announced (%d); "
                    "waiting for weights from %s",
                    self.index,
                    self.policy_version,
                    self.cfg.max_policy_lag,
                    self.watch.newest,
                    self.subscriber.target if self.subscriber else "nowhere",
                )
            self.stats.paused += 1
            self.feed.idle()
            if self.subscriber is not None:
                try:
                    self.subscriber.wait_for(self.watch.newest - self.cfg.max_policy_lag, timeout_s=1.0)
                except TimeoutError:
                    pass
            return []
        problems = self.feed.take(self.cfg.prompts_per_batch)
        if not problems:
            self.stats.idle += 1
            return []
        prompts = [self.generator.prompt_ids(p.messages) for p in problems]
        groups = []
        for problem, ids, completions in zip(
            problems, prompts, self.generator.sample(prompts, self.cfg.samples_per_prompt), strict=True
        ):
            try:
                samples = scored_samples(self.task, problem, completions)
            except RewardError as exc:  # this group goes nowhere; the next ones may score fine
                self.stats.unscored += 1
                log.warning("searcher %d: group of prompt %s not sent: %s", self.index, problem.prompt_id, exc)
                continue
            group = TrajectoryGroup(
                prompt_id=problem.prompt_id,
                task=task_label(self.task.cfg),
                prompt=self.generator.tokenizer.decode(ids),
                prompt_token_ids=np.array(ids, np.int32),
                samples=samples,
                policy_version=self.policy_version,
                generator_id=self.generator_id,
                model_id=self.model_id,
                metadata={"answer": problem.answer, "temperature": str(self.cfg.temperature)},
            )
            self.producer.send(group)
            groups.append(group)
        self.producer.flush()  # a delivery failure surfaces here, at the batch that caused it
        self.feed.commit()  # only now: a searcher dying before this leaves the batch to be redone
        self.stats.batches += 1
        if not groups:
            return groups
        n = self.stats.groups
        batch_reward = float(np.mean([s.reward for g in groups for s in g.samples]))
        self.stats.mean_reward = (self.stats.mean_reward * n + batch_reward * len(groups)) / (n + len(groups))
        self.stats.groups += len(groups)
        self.stats.samples += sum(len(g.samples) for g in groups)
        self.stats.tokens += sum(s.token_ids.size for g in groups for s in g.samples)
        return groups

    def close(self) -> None:
        """Stops in bounded time whatever Kafka does: every batch was flushed, so what is left to send is
        at most a batch that failed anyway."""
        try:
            self.feed.close()  # leaves the searchers' group: the others take its prompts now
            self.producer.close(kafka_clients.CLOSE_TIMEOUT_S)
        finally:
            self.generator.close()
            for part in (self.subscriber, self.watch):
                if part is not None:
                    part.close()

    def run(self, stop: threading.Event | None = None, max_batches: int | None = None) -> SearcherStats:
        stop = stop or threading.Event()
        while not stop.is_set() and (max_batches is None or self.stats.batches < max_batches):
            start = time.monotonic()
            groups = self.step()
            if not groups:  # paused or idle (no prompts partition held): each says so where it happens
                continue
            log.info(
                "searcher %d: %d groups at policy version %d in %.1fs",
                self.index,
                len(groups),
                self.policy_version,
                time.monotonic() - start,
            )
        return self.stats


def build_searcher(cfg: TbaConfig, index: int) -> Searcher:
    """A searcher as configured: model and frozen reference from disk, task, producer, weight subscriber."""
    from ops.job import model_id
    from policy.tasks import build_task

    generator = build_generator(cfg, cfg.searcher.seed + index)
    subscriber = weight_subscriber(cfg, f"searcher-{index}")
    topics = JobTopics(cfg)
    producer = TrajectoryProducer(cfg, topic=topics.raw)
    task = build_task(cfg.task)
    feed = PromptFeed(topics.prompts, f"searcher-{index}")  # first: it says so when the job has no prompts topic
    seed_prompts(topics.prompts, task.train)  # the job's first searcher writes the training split; later ones find it
    watch = PolicyWatch(topics.policy_versions)
    return Searcher(cfg, index, generator, task, producer, feed, subscriber, model_id(cfg), watch)
