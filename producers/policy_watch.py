"""The newest policy version the trainer has announced, read from the compacted policy-versions topic."""

from __future__ import annotations

from kafka import TopicPartition

from ops import kafka_clients
from ops.acls import READ, one_line_refusals
from ops.topics import Topic


class PolicyWatch:
    def __init__(self, policy_versions: Topic):
        self.cfg = policy_versions.cfg
        self.topic = policy_versions
        self.tp = TopicPartition(policy_versions.name, 0)
        self.consumer = policy_versions.consumer()
        self.consumer.assign([self.tp])
        self._read_to = 0
        self.newest = -1

    def poll(self) -> int:
        """The newest announced version (-1 before any); reads only the last record when more arrived."""
        with one_line_refusals(self.cfg, READ):
            end = self.consumer.end_offsets([self.tp])[self.tp]
            if end > self._read_to:
                self.consumer.seek(self.tp, end - 1)
                for rec in self.consumer.poll(timeout_ms=1000).get(self.tp, []):
                    self.newest = max(self.newest, self.topic.codec.decode(rec.value)["version"])
                self._read_to = end
        return self.newest

    def close(self) -> None:
        self.consumer.close(timeout_ms=int(kafka_clients.CLOSE_TIMEOUT_S * 1000))
