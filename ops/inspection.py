"""`tba inspect`: what a running (or finished) job's topics hold, read from Kafka alone."""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict

from kafka import TopicPartition

from ops import kafka_clients
from ops.config import TbaConfig
from ops.errors import DecodeError
from ops.topics import describe_topics, read_topic, topic_names
from schemas.codec import SchemaStore
from schemas.records import DeadLetterCodec, PolicyVersionCodec, TrajectoryCodec


def filter_lag(cfg: TbaConfig) -> dict[str, int]:
    """Per raw partition: records the filter group has not committed yet."""
    group = f"{cfg.kafka.namespace}.{cfg.filter.group}"
    raw = topic_names(cfg).raw
    admin = kafka_clients.admin(cfg)
    consumer = kafka_clients.consumer(cfg)
    try:
        parts = [TopicPartition(raw, p) for p in sorted(consumer.partitions_for_topic(raw) or ())]
        ends = consumer.end_offsets(parts)
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        return {
            str(tp.partition): ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in parts
        }
    finally:
        consumer.close()
        admin.close()


def inspect_job(cfg: TbaConfig, scan: int = 10_000) -> dict:
    """Topics and end offsets, filter lag, curated groups and mean reward per policy version (the last
    `scan` records of each partition), dead letters by scorer with an example reason, announced versions."""
    names = topic_names(cfg)
    store = SchemaStore(cfg)
    groups, rewards = Counter(), defaultdict(list)
    codec = TrajectoryCodec(store)
    for rec in read_topic(cfg, names.curated, last=scan):
        try:
            group = codec.decode(rec.value)
        except DecodeError:
            continue
        groups[group.policy_version] += 1
        rewards[group.policy_version].extend(s.reward for s in group.samples)
    letters, examples = Counter(), {}
    dlq = DeadLetterCodec(store)
    for rec in read_topic(cfg, names.dlq, last=scan):
        try:
            letter = dlq.decode(rec.value)
            scorer, reason = letter.scorer, letter.reason
        except DecodeError as exc:  # someone else's bytes in the dlq: counted, not fatal
            scorer, reason = "undecodable letter", f"{rec.partition}:{rec.offset}: {exc}"
        letters[scorer] += 1
        examples.setdefault(scorer, reason)
    versions = PolicyVersionCodec(store)
    announced = []
    for rec in read_topic(cfg, names.policy_versions, "read_uncommitted"):
        with contextlib.suppress(DecodeError):
            announced.append(versions.decode(rec.value))
    return {
        "topics": describe_topics(cfg),
        "filter_lag": filter_lag(cfg),
        "curated_by_policy_version": {
            str(v): {"groups": groups[v], "mean_reward": sum(rewards[v]) / max(1, len(rewards[v]))}
            for v in sorted(groups)
        },
        "dlq_by_scorer": {k: {"records": n, "example": examples[k]} for k, n in letters.most_common()},
        "policy_versions": [{k: a[k] for k in ("version", "step", "sha256", "published_at")} for a in announced[-5:]],
    }
