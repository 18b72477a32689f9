"""The data-plane demo: a stream of groups (some malformed) -> filter -> curated -> ReplayBuffer."""

from __future__ import annotations

import threading
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from consumers.filter import FilterConsumer
from ops import kafka_clients
from ops.broker import job_broker
from ops.config import TbaConfig, with_overrides
from ops.errors import DecodeError
from ops.topics import JobTopics, create_topics
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import BAD_KINDS, synthetic_group
from trainer.curated_feed import CuratedFeed, curated_buffer


def ensure_local_broker(cfg: TbaConfig, console: Console) -> None:
    """Start the configured local broker when the bootstrap address is its own port."""
    broker = job_broker(cfg)
    if broker is not None and broker.status() is None:
        with console.status(f"starting Kafka on {broker.bootstrap} (data in {broker.data_dir})"):
            broker.start()


def run_demo(cfg: TbaConfig) -> dict:
    console = Console()
    ensure_local_broker(cfg, console)
    # A namespace per run: the numbers below are this run's alone.
    cfg = with_overrides(cfg, kafka={"namespace": f"{cfg.kafka.namespace or 'tba'}-demo-{int(time.time())}"})
    topics = JobTopics(cfg)
    create_topics(cfg)
    console.print(f"namespace [bold]{cfg.kafka.namespace}[/]: topics {topics.raw}, {topics.curated}, {topics.dlq}")
    store = topics.store
    d = cfg.demo
    rng = np.random.default_rng(d.seed)

    t0 = time.monotonic()
    expected_bad: dict[str, int] = {}
    with TrajectoryProducer(cfg, topic=topics.raw) as producer:
        for i in range(d.groups):
            group = synthetic_group(
                rng, i % max(1, d.groups // 4), d.samples, d.completion_tokens, policy_version=i * 4 // d.groups
            )
            if rng.random() < d.bad_fraction:
                kind = list(BAD_KINDS)[int(rng.integers(len(BAD_KINDS)))]
                group = BAD_KINDS[kind](group)
                expected_bad[kind] = expected_bad.get(kind, 0) + 1
            producer.send(group)
    raw = kafka_clients.producer(cfg)
    topics.raw.send(raw, rng.bytes(200), b"garbage").get(timeout=30)  # an undecodable record
    raw.close()
    expected_bad["decode"] = 1
    produce_s = time.monotonic() - t0

    t1 = time.monotonic()
    stop = threading.Event()
    worker = FilterConsumer(cfg, instance="demo", store=store)
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_exit_s": 3.0})
    with console.status("filtering raw -> curated | dlq"):
        thread.start()
        thread.join()
    worker.close()
    filter_s = time.monotonic() - t1 - 3.0

    buffer = curated_buffer(cfg, topics.curated)
    feed = CuratedFeed(cfg, buffer)
    feed.fill()
    feed.close()
    batch = buffer.sample(4)

    reasons = _dlq_reasons(topics)
    stats = worker.stats
    table = Table(title="tba-stream data plane demo")
    table.add_column("stage")
    table.add_column("count", justify="right")
    table.add_column("detail")
    table.add_row("produced", str(d.groups + 1), f"{d.groups} groups + 1 undecodable, {produce_s:.1f}s")
    table.add_row("curated", str(stats.accepted), f"filtered in {filter_s:.1f}s, {stats.transactions} transactions")
    for scorer, n in sorted(stats.rejected.items()):
        table.add_row(f"dlq: {scorer}", str(n), reasons.get(scorer, ""))
    table.add_row(
        "replay buffer",
        str(len(buffer)),
        f"{buffer.num_prompts} prompts, newest policy version {buffer.newest_version}",
    )
    for sp in batch:
        rewards = ", ".join(f"{s.reward:.0f}" for s in sp.samples)
        table.add_row(
            "sampled", sp.prompt_id, f"{'newest version' if sp.on_policy else 'any version'}; rewards [{rewards}]"
        )
    console.print(table)
    buffer.close()
    return {
        "accepted": stats.accepted,
        "rejected": dict(stats.rejected),
        "expected_bad": expected_bad,
        "buffer": len(buffer),
    }


def _dlq_reasons(topics: JobTopics) -> dict[str, str]:
    """One example reason per scorer, read back from the dead-letter topic."""
    out: dict[str, str] = {}
    for _, letter in topics.dlq.decoded(topics.dlq.read()):
        if not isinstance(letter, DecodeError):
            out.setdefault(letter.scorer, letter.reason)
    return out
