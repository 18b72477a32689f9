"""The schema store on Kafka: writer schemas shared through the namespace's compacted schemas topic
(key: fingerprint as 16 hex digits, value: canonical form)."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError

from ops import kafka_clients
from ops.acls import READ, WRITE, one_line_refusals
from ops.config import TbaConfig
from ops.errors import TbaError
from ops.topics import schemas_topic
from schemas.codec import SchemaStore


class KafkaSchemaStore(SchemaStore):
    def __init__(self, cfg: TbaConfig):
        super().__init__()
        self.cfg = cfg
        self.topic = schemas_topic(cfg)

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
        with one_line_refusals(self.cfg, READ):
            records = self.topic.read()
        shared = []
        for r in records:  # anyone may write this topic: a key that is no fingerprint is not a registration
            try:
                shared.append((bytes.fromhex((r.key or b"").decode("ascii")), (r.value or b"").decode("utf-8")))
            except (UnicodeDecodeError, ValueError):
                continue
        return shared
