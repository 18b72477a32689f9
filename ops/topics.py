"""The namespaced topics, declared once, and `tba topics create|describe` via kafka-python's admin client."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError, TopicAuthorizationFailedError

from ops import kafka_clients
from ops.config import TbaConfig
from ops.errors import ConfigError

HOUR_MS = 3_600_000
SHOWN_CONFIG = ("cleanup.policy", "retention.ms", "retention.bytes", "compression.type", "max.message.bytes",
                "min.insync.replicas")  # fmt: skip


@dataclass(frozen=True)
class TopicNames:
    raw: str
    curated: str
    dlq: str
    schemas: str
    policy_versions: str
    prompts: str


def topic_names(cfg: TbaConfig) -> TopicNames:
    ns = cfg.kafka.namespace
    if ns is None:  # ops.job.for_job resolves it; reaching here without it is a bug of the caller
        raise ConfigError("kafka.namespace: no job namespace resolved (ops.job.for_job)")
    return TopicNames(
        raw=f"{ns}.trajectories.raw",
        curated=f"{ns}.trajectories.curated",
        dlq=f"{ns}.trajectories.dlq",
        schemas=f"{ns}.schemas",
        policy_versions=f"{ns}.policy.versions",
        prompts=f"{ns}.prompts",
    )


def filter_group(cfg: TbaConfig) -> str:
    """The filter instances' consumer group; an instance's transactional id is this + "." + its instance id."""
    return f"{cfg.kafka.namespace}.{cfg.filter.group}"


def searcher_group(cfg: TbaConfig) -> str:
    """The searchers' consumer group over the prompts topic."""
    return f"{cfg.kafka.namespace}.searchers"


def prompts_seed_id(cfg: TbaConfig) -> str:
    """The one transactional id every searcher seeds the prompts topic with (so it gets one copy)."""
    return f"{topic_names(cfg).prompts}.seed"


def _retention(hours: float, gb: float | None = None, partitions: int = 1) -> dict[str, str]:
    """Kafka's retention settings: by time, and by size (retention.bytes counts per partition; None: unbounded)."""
    size = -1 if gb is None else int(gb * 1e9 / partitions)
    return {"retention.ms": str(-1 if hours < 0 else int(hours * HOUR_MS)), "retention.bytes": str(size)}


def topic_specs(cfg: TbaConfig) -> list[NewTopic]:
    """Every topic of the namespace with its partitions and config."""
    t, names = cfg.topics, topic_names(cfg)
    base = {
        "max.message.bytes": str(cfg.kafka.max_message_bytes),
        "min.insync.replicas": str(t.min_insync_replicas),
    }
    stream = {**base, "compression.type": "producer"}
    compacted = {**base, "cleanup.policy": "compact"}
    specs = [
        (names.raw, t.partitions, {**stream, **_retention(t.raw_retention_hours, t.raw_retention_gb, t.partitions)}),
        (names.curated, t.partitions, {**stream, **_retention(t.curated_retention_hours)}),
        (names.dlq, 1, {**stream, **_retention(t.dlq_retention_hours, t.dlq_retention_gb)}),
        (names.schemas, 1, compacted),
        (names.policy_versions, 1, compacted),
        # the searchers' consumer group cycles through it for as long as the job runs: kept forever
        (names.prompts, t.partitions, {**stream, "retention.ms": "-1"}),
    ]
    return [
        NewTopic(name=name, num_partitions=parts, replication_factor=t.replication_factor, topic_configs=conf)
        for name, parts, conf in specs
    ]


def create_topics(cfg: TbaConfig) -> list[str]:
    """Create the namespace's topics that do not exist yet; returns the names created."""
    admin = kafka_clients.admin(cfg)
    try:
        existing = set(admin.list_topics())
        missing = [spec for spec in topic_specs(cfg) if spec.name not in existing]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=int(cfg.kafka.client_timeout_s * 1000))
            except TopicAlreadyExistsError:
                pass  # another process created them between list and create
        return [spec.name for spec in missing]
    finally:
        admin.close()


def describe_topics(cfg: TbaConfig) -> list[dict]:
    """Name, partitions, replication, end offsets and key config of each namespaced topic."""
    admin = kafka_clients.admin(cfg)
    consumer = kafka_clients.consumer(cfg)
    try:
        existing = set(admin.list_topics())
        names = [spec.name for spec in topic_specs(cfg) if spec.name in existing]
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])["topic"]
        rows = []
        for meta in admin.describe_topics(names):
            parts = meta["partitions"]
            ends = consumer.end_offsets([TopicPartition(meta["name"], p["partition_index"]) for p in parts])
            rows.append(
                {
                    "topic": meta["name"],
                    "partitions": len(parts),
                    "replication": len(parts[0]["replica_nodes"]) if parts else 0,
                    "end_offsets": sum(ends.values()),
                    **{key: entry["value"] for key, entry in configs[meta["name"]].items() if key in SHOWN_CONFIG},
                }
            )
        return rows
    finally:
        consumer.close()
        admin.close()


def end_offsets(cfg: TbaConfig, topics: list[str], isolation: str = "read_committed") -> dict[str, int]:
    """Each topic's end offsets summed over its partitions (records written, transaction markers included);
    read_committed ends at a partition's first open transaction, read_uncommitted at its last record."""
    consumer = kafka_clients.consumer(cfg, isolation_level=isolation)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        totals = dict.fromkeys(topics, 0)
        for tp, end in consumer.end_offsets(parts).items():
            totals[tp.topic] += end
        return totals
    finally:
        consumer.close()


def topic_partitions(cfg: TbaConfig, consumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions, [] when it does not exist. A topic this principal may not see looks absent
    in a consumer's metadata: the admin's answer tells the two apart (TopicAuthorizationFailedError)."""
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not parts and cfg.kafka.security_protocol.startswith("SASL"):
        admin = kafka_clients.admin(cfg)
        try:
            if any(t["error_code"] == TopicAuthorizationFailedError.errno for t in admin.describe_topics([topic])):
                raise TopicAuthorizationFailedError(topic)
        finally:
            admin.close()
    return parts


def read_topic(cfg: TbaConfig, topic: str, isolation: str = "read_committed", last: int | None = None) -> list:
    """Every record of a topic (or its last `last` offsets of each partition) up to its end as of now."""
    consumer = kafka_clients.consumer(cfg, isolation_level=isolation)
    try:
        parts = topic_partitions(cfg, consumer, topic)
        consumer.assign(parts)
        end = consumer.end_offsets(parts)
        begin = consumer.beginning_offsets(parts)
        for tp in parts:
            consumer.seek(tp, begin[tp] if last is None else max(begin[tp], end[tp] - last))
        out = []
        # position, not record count, says when we are done: transaction markers take offsets too
        while any(consumer.position(tp) < end[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        return out
    finally:
        consumer.close()
