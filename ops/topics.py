"""The job's topics, each one object made once per process (JobTopics of Topics: name, partitions, config, codec,
isolation level), the schema store on the schemas topic, and `tba topics create|describe` (names: ops/names.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import fastavro
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError, TopicAuthorizationFailedError

from ops import kafka_clients
from ops.acls import READ, WRITE, one_line_refusals
from ops.config import TbaConfig
from ops.errors import DecodeError, RegistryError, TbaError
from ops.names import topic_names
from schemas.codec import SchemaStore
from schemas.records import DeadLetterCodec, PolicyVersionCodec, PromptCodec, TrajectoryCodec

HOUR_MS = 3_600_000
REGISTRY_DOWN_S = 5.0  # a registry found unreachable fails lookups at once for this long, then is asked again
SHOWN_CONFIG = ("cleanup.policy", "retention.ms", "retention.bytes", "compression.type", "max.message.bytes",
                "min.insync.replicas")  # fmt: skip
# What a topic's readers see: the filter writes curated and dlq in transactions, a searcher seeds the prompts in
# one; the compacted topics are written without, and a reader of them wants the newest record whatever is open.
COMMITTED, UNCOMMITTED = "read_committed", "read_uncommitted"


# -- reading ---------------------------------------------------------------------------------------------------


def read_range(consumer: KafkaConsumer, start: dict[TopicPartition, int], stop: dict[TopicPartition, int],
               max_records: int | None = None) -> Iterator[dict[TopicPartition, list]]:  # fmt: skip
    """Seek each partition of an assigned consumer to start and yield each poll's records below stop (a poll
    may yield none: a caller can check its own stop between polls), until every position reaches stop.
    Position, not record count, says when: transaction markers and aborted records take offsets too."""
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    todo = {tp for tp in start if start[tp] < stop[tp]}
    while todo:
        batch = consumer.poll(timeout_ms=500, max_records=max_records)
        yield {tp: [r for r in records if r.offset < stop[tp]] for tp, records in batch.items() if tp in todo}
        todo = {tp for tp in todo if consumer.position(tp) < stop[tp]}


def read_topic(cfg: TbaConfig, topic: str, isolation: str = COMMITTED, last: int | None = None) -> list:
    """Every record of a topic (or its last `last` offsets of each partition) up to its end as of now."""
    consumer = kafka_clients.consumer(cfg, isolation_level=isolation)
    try:
        return read_to_end(cfg, consumer, topic, last=last)[0]
    finally:
        consumer.close()


def read_to_end(cfg: TbaConfig, consumer: KafkaConsumer, topic: str, since: dict[TopicPartition, int] | None = None,
                last: int | None = None) -> tuple[list, dict[TopicPartition, int]]:  # fmt: skip
    """A topic's records from `since` (default: each partition's beginning, or its last `last` offsets) up to its
    end as of now, and that end, through a consumer of the caller's."""
    parts = topic_partitions(cfg, consumer, topic)
    consumer.assign(parts)
    end, begin = consumer.end_offsets(parts), consumer.beginning_offsets(parts)
    if since is None:
        since = {tp: end[tp] - last for tp in parts} if last is not None else {}
    start = {tp: max(begin[tp], since.get(tp, 0)) for tp in parts}
    return [r for batch in read_range(consumer, start, end) for records in batch.values() for r in records], end


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


def end_offsets(cfg: TbaConfig, topics: list[str], isolation: str = COMMITTED) -> dict[str, int]:
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


# -- the topics ------------------------------------------------------------------------------------------------


class Topic:
    """One topic of the job: its name, partitions and config, the isolation level its readers read it at, and
    the codec of its values (made on first use, as it registers its schema; None for the schemas topic, whose
    values are schema texts). The operations every role needs, so none pairs a name with the rest by hand."""

    def __init__(self, cfg: TbaConfig, name: str, partitions: int, config: dict[str, str], isolation: str,
                 codec_for: Callable[[SchemaStore], Any] | None = None, store: SchemaStore | None = None):  # fmt: skip
        self.cfg, self.name, self.partitions, self.config, self.isolation = cfg, name, partitions, config, isolation
        self._codec_for, self._store = codec_for, store

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"

    def __str__(self) -> str:
        return self.name

    @cached_property
    def codec(self):
        if self._codec_for is None:
            raise TypeError(f"{self.name} holds no Avro values")
        codec = self._codec_for(self._store)
        if self.cfg.kafka.wire_format == "confluent":
            codec.avro.write_confluent(f"{self.name}-value")  # Confluent's subject naming (TopicNameStrategy)
        return codec

    def new_topic(self) -> NewTopic:
        """What creating it asks for."""
        replication = self.cfg.topics.replication_factor
        return NewTopic(name=self.name, num_partitions=self.partitions, replication_factor=replication,
                        topic_configs=self.config)  # fmt: skip

    def consumer(self, **overrides: Any) -> KafkaConsumer:
        """A consumer reading at this topic's isolation level (not yet assigned or subscribed)."""
        return kafka_clients.consumer(self.cfg, **{"isolation_level": self.isolation, **overrides})

    def partitions_in(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        """Its partitions as the consumer's metadata has them ([] when it does not exist; see topic_partitions)."""
        return topic_partitions(self.cfg, consumer, self.name)

    def produce(self, producer: KafkaProducer, record: Any, key: bytes | None = None, **send: Any):
        """Send a record, encoded by this topic's codec; returns the send's future."""
        return self.send(producer, self.codec.encode(record), key, **send)

    def send(self, producer: KafkaProducer, value: bytes, key: bytes | None = None, **send: Any):
        """Send bytes already encoded (a routed group, a dead letter's original record)."""
        return producer.send(self.name, key=key, value=value, **send)

    def read_range(self, consumer: KafkaConsumer, start: dict[TopicPartition, int], stop: dict[TopicPartition, int],
                   max_records: int | None = None) -> Iterator[dict[TopicPartition, list]]:  # fmt: skip
        """Its records in [start, stop) of each partition, poll by poll, with a consumer of its partitions."""
        return read_range(consumer, start, stop, max_records)

    def decoded(self, records) -> Iterator[tuple[Any, Any]]:
        """(record, its value decoded, or the DecodeError for bytes its codec cannot read): anyone may write a
        topic, so a stranger's record is shown or counted, never fatal."""
        for rec in records:
            try:
                yield rec, self.codec.decode(rec.value)
            except DecodeError as exc:
                yield rec, exc

    def read(self, last: int | None = None) -> list:
        """Its records (the last `last` offsets of each partition) up to its end as of now."""
        return read_topic(self.cfg, self.name, self.isolation, last)


def _retention(hours: float, gb: float | None = None, partitions: int = 1) -> dict[str, str]:
    """Kafka's retention settings: by time, and by size (retention.bytes counts per partition; None: unbounded)."""
    size = -1 if gb is None else int(gb * 1e9 / partitions)
    return {"retention.ms": str(-1 if hours < 0 else int(hours * HOUR_MS)), "retention.bytes": str(size)}


def _base_config(cfg: TbaConfig) -> dict[str, str]:
    return {"max.message.bytes": str(cfg.kafka.max_message_bytes),
            "min.insync.replicas": str(cfg.topics.min_insync_replicas)}  # fmt: skip


def _compacted(cfg: TbaConfig) -> dict[str, str]:
    return {**_base_config(cfg), "cleanup.policy": "compact"}


def schemas_topic(cfg: TbaConfig) -> Topic:
    """The schema store's topic (KafkaSchemaStore): key a fingerprint, value a schema's canonical text."""
    return Topic(cfg, topic_names(cfg).schemas, 1, _compacted(cfg), UNCOMMITTED)


class KafkaSchemaStore(SchemaStore):
    """Writer schemas shared through the namespace's compacted schemas topic (key: fingerprint as 16 hex digits,
    value: canonical form); and, with kafka.schema_registry_url, those of Confluent's framing by their registry id."""

    def __init__(self, cfg: TbaConfig):
        super().__init__()
        self.cfg = cfg
        self.topic = schemas_topic(cfg)
        self._by_id: dict[int, Any] = {}
        self._registry_down_until = 0.0  # after a lookup that found it unreachable: fail fast for a moment
        self._reader: KafkaConsumer | None = None  # of the schemas topic, made on the first fetch
        self._fetched_to: dict[TopicPartition, int] = {}
        self._fetch_lock = threading.Lock()

    @cached_property
    def registry(self):
        """The schema registry's client (Confluent's own: its auth, TLS and caching; imported here, as it takes
        a second and most jobs never ask)."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # retried here (ask_registry), for a stated time: its own retries would wait on their own schedule
        return SchemaRegistryClient({"url": self.cfg.kafka.schema_registry_url, "timeout": 10, "max.retries": 0})

    def ask_registry(self, call: Callable[[], Any], what: str, error: type[TbaError]) -> Any:
        """call() against the registry, tried again for kafka.client_timeout_s while it is unreachable or failing
        (a restart, a network hiccup); error naming what was asked when it refuses, or never answers."""
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        url = self.cfg.kafka.schema_registry_url
        deadline, wait = time.monotonic() + self.cfg.kafka.client_timeout_s, 0.2
        while True:
            try:
                return call()
            except SchemaRegistryError as exc:
                if exc.http_status_code < 500:  # it answered: no
                    raise error(f"the schema registry at {url} refused {what}: {exc.error_message}") from exc
                failure = exc
            except Exception as exc:  # noqa: BLE001  (its HTTP library's errors: connection refused, timeouts)
                failure = exc
            now = time.monotonic()
            if now >= deadline or now < self._registry_down_until:
                self._registry_down_until = now + REGISTRY_DOWN_S
                raise error(f"the schema registry at {url} did not answer {what} ({type(failure).__name__}: "
                            f"{failure}); tried for {self.cfg.kafka.client_timeout_s:.0f}s") from failure  # fmt: skip
            time.sleep(min(wait, deadline - now))
            wait = min(2 * wait, 2.0)

    def by_id(self, schema_id: int):
        if not self.cfg.kafka.schema_registry_url:
            return super().by_id(schema_id)
        if schema_id not in self._by_id:
            schema = self.ask_registry(
                lambda: self.registry.get_schema(schema_id), f"schema id {schema_id}", DecodeError
            )
            if schema.schema_type not in (None, "AVRO"):
                raise DecodeError(f"schema id {schema_id} is a {schema.schema_type} schema, not Avro")
            try:
                self._by_id[schema_id] = fastavro.parse_schema(json.loads(schema.schema_str))
            except (ValueError, fastavro.schema.SchemaParseException) as exc:
                raise DecodeError(f"schema id {schema_id} of the schema registry is no Avro schema: {exc}") from exc
        return self._by_id[schema_id]

    def registered_id(self, subject: str, schema: dict) -> int:
        if not self.cfg.kafka.schema_registry_url:
            return super().registered_id(subject, schema)
        from confluent_kafka.schema_registry import Schema

        text = json.dumps(schema)
        return self.ask_registry(lambda: self.registry.register_schema(subject, Schema(text, "AVRO")),
                                 f"{schema.get('name')} under the subject {subject}", RegistryError)  # fmt: skip

    def publish(self, fp: bytes, canonical: str) -> None:
        producer = kafka_clients.producer(self.cfg, compression_type=None, linger_ms=0)
        timeout = self.cfg.kafka.client_timeout_s
        try:
            with one_line_refusals(self.cfg, WRITE):
                self.topic.send(producer, canonical.encode(), key=fp.hex().encode()).get(timeout=timeout)
        except KafkaTimeoutError as exc:  # the broker answers, but not for this topic: it was never created
            raise TbaError(
                f"could not publish a schema to {self.topic.name} within {timeout:.0f}s: "
                f"were the namespace's topics created (`tba topics create`)?"
            ) from exc
        finally:
            producer.close()

    def fetch(self) -> list[tuple[bytes, str]]:
        """The registrations written since the last fetch, by one consumer kept for it: each unknown fingerprint
        fetches, and a stranger's stream of them re-read the whole topic per record (a filter's main cost)."""
        with self._fetch_lock, one_line_refusals(self.cfg, READ):
            if self._reader is None:
                self._reader = self.topic.consumer()
            records, self._fetched_to = read_to_end(self.cfg, self._reader, self.topic.name, self._fetched_to)
        shared = []
        for r in records:  # anyone may write this topic: a key that is no fingerprint is not a registration
            try:
                shared.append((bytes.fromhex((r.key or b"").decode("ascii")), (r.value or b"").decode("utf-8")))
            except (UnicodeDecodeError, ValueError):
                continue
        return shared


class JobTopics:
    """Every topic of the job, made once per process and handed to what reads or writes them."""

    def __init__(self, cfg: TbaConfig, store: SchemaStore | None = None):
        store = KafkaSchemaStore(cfg) if store is None else store
        self.cfg, self.store = cfg, store
        t, names = cfg.topics, topic_names(cfg)
        stream = {**_base_config(cfg), "compression.type": "producer"}
        raw_retention = _retention(t.raw_retention_hours, t.raw_retention_gb, t.partitions)
        self.raw = Topic(cfg, names.raw, t.partitions, {**stream, **raw_retention}, COMMITTED, TrajectoryCodec, store)
        curated = {**stream, **_retention(t.curated_retention_hours)}
        self.curated = Topic(cfg, names.curated, t.partitions, curated, COMMITTED, TrajectoryCodec, store)
        dlq = {**stream, **_retention(t.dlq_retention_hours, t.dlq_retention_gb)}
        self.dlq = Topic(cfg, names.dlq, 1, dlq, COMMITTED, DeadLetterCodec, store)
        self.schemas = schemas_topic(cfg)
        versions = _compacted(cfg)
        self.policy_versions = Topic(cfg, names.policy_versions, 1, versions, UNCOMMITTED, PolicyVersionCodec, store)
        # the searchers' consumer group cycles through it for as long as the job runs: kept forever
        prompts = {**stream, "retention.ms": "-1"}
        self.prompts = Topic(cfg, names.prompts, t.partitions, prompts, COMMITTED, PromptCodec, store)

    def __iter__(self) -> Iterator[Topic]:
        return iter((self.raw, self.curated, self.dlq, self.schemas, self.policy_versions, self.prompts))


# -- administration --------------------------------------------------------------------------------------------


def topic_specs(cfg: TbaConfig) -> list[NewTopic]:
    """Every topic of the namespace with its partitions and config."""
    return [topic.new_topic() for topic in JobTopics(cfg, SchemaStore())]  # no values written: any store does


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
