"""TrajectoryProducer: the one way a TrajectoryGroup gets into Kafka (searchers and external generators).

Idempotent with acks=all (the client factory sets both), keyed by prompt_id so a prompt's groups
stay ordered on one partition. A delivery failure is raised to the caller on its next send, flush
or close: nothing acknowledged is ever silently lost, nothing lost is ever silently ignored.
"""

from __future__ import annotations

from kafka.errors import AuthorizationError, KafkaTimeoutError

from ops import kafka_clients
from ops.acls import WRITE, refusal
from ops.config import TbaConfig
from ops.errors import DeliveryError
from ops.topics import JobTopics, Topic
from schemas.codec import SchemaStore
from schemas.records import TrajectoryGroup


class TrajectoryProducer:
    def __init__(self, cfg: TbaConfig, store: SchemaStore | None = None, topic: Topic | None = None):
        """Writes to topic (a Topic of TrajectoryGroups, with its own store), by default the job's raw topic
        with store (default the job's schema store)."""
        self.cfg = cfg
        self.topic = topic or JobTopics(cfg, store).raw
        self.codec = self.topic.codec  # made now: a store that cannot register the schema fails here, not mid-send
        self._producer = kafka_clients.producer(cfg)
        self._timeout_s = cfg.kafka.client_timeout_s
        self.max_bytes = cfg.kafka.max_message_bytes
        self._failures: list[Exception] = []
        self.sent = 0
        self.acked = 0
        self.failed = 0

    def send(self, group: TrajectoryGroup):
        """Encode and queue one group; returns the future of its record metadata."""
        self._raise_failures()
        future = self.topic.produce(self._producer, group, key=group.prompt_id.encode())
        future.add_callback(self._on_ack)
        future.add_errback(self._on_failure)
        self.sent += 1
        return future

    def _on_ack(self, _metadata) -> None:
        self.acked += 1

    def _on_failure(self, exc: Exception) -> None:
        self.failed += 1
        self._failures.append(exc)

    def _raise_failures(self) -> None:
        if self._failures:
            first, n = self._failures[0], len(self._failures)
            self._failures.clear()
            if isinstance(first, AuthorizationError):  # no retry helps: this principal may not write here
                raise refusal(self.cfg, first, WRITE) from first
            raise DeliveryError(f"{n} group(s) were not acknowledged by Kafka: {first}") from first

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued group is acknowledged (at most timeout_s, default kafka.client_timeout_s);
        raise DeliveryError if any was not."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError:
            pass  # said below, with how many
        self._raise_failures()
        if self.acked + self.failed < self.sent:
            raise DeliveryError(f"{self.sent - self.acked} group(s) still unacknowledged after {timeout_s}s")

    def close(self, timeout_s: float | None = None) -> None:
        """Flush and close, each waiting on Kafka at most timeout_s (default kafka.client_timeout_s)."""
        try:
            self.flush(timeout_s)
        finally:
            try:
                self._producer.close(timeout=self._timeout_s if timeout_s is None else timeout_s)
            except KafkaTimeoutError:
                pass  # kafka-python's close flushes again and gives up as flush did, which said what is unsent

    def __enter__(self) -> TrajectoryProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
