"""GroupReader: curated records read back from Kafka by (partition, offset), for the replay buffer's
groups that are no longer decoded in memory.

A Kafka fetch asks each partition for one position, so one request asks every partition that still
owes records for its next one, and a batch costs as many round trips as the most records one partition
owes. A round trip's cost here is Python decoding the record batches the broker returns (measured:
~7 ms, 100-400 records parsed for each one wanted), not waiting: more consumers in parallel threads
did not read faster, so there is one; ReplayBuffer.prefetch hides the reading behind a training step.
"""

from __future__ import annotations

import threading

from kafka import TopicPartition

from ops import kafka_clients
from ops.config import TbaConfig
from ops.errors import TbaError

READ_BACK_BYTES = 64 * 1024  # per partition and request: a record batch or a few, not megabytes of neighbours


class GroupReader:
    def __init__(self, cfg: TbaConfig, topic: str):
        self.cfg = cfg
        self.topic = topic
        self._consumer = None
        self._lock = threading.Lock()  # a prefetch reads on its own thread; a consumer serves one at a time

    def read(self, wanted: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], bytes], list[tuple[int, int]]]:
        """The record values at these (partition, offset)s, and those Kafka no longer holds (retention or
        compaction removed them)."""
        owed: dict[int, set[int]] = {}
        for p, o in wanted:
            owed.setdefault(p, set()).add(o)
        with self._lock:
            if self._consumer is None:  # made on first use: most buffers never read anything back
                self._consumer = kafka_clients.consumer(self.cfg, max_partition_fetch_bytes=READ_BACK_BYTES)
            return self._read(owed)

    def _read(self, owed: dict[int, set[int]]):
        consumer = self._consumer
        found: dict[tuple[int, int], bytes] = {}
        gone: list[tuple[int, int]] = []
        partitions = {p: TopicPartition(self.topic, p) for p in owed}
        while owed:
            consumer.assign([partitions[p] for p in owed])  # only those that still owe records
            for p, offsets in owed.items():
                consumer.seek(partitions[p], min(offsets))
            batch = consumer.poll(timeout_ms=self.cfg.kafka.client_timeout_s * 1000)
            if not any(batch.get(partitions[p]) for p in owed):
                gone += self._expired(owed, partitions)
            for p, offsets in owed.items():
                records = batch.get(partitions[p], ())
                for rec in records:
                    if rec.offset in offsets:
                        offsets.discard(rec.offset)
                        found[(p, rec.offset)] = rec.value
                # records come in offset order from the one sought: an owed offset they passed over is gone
                passed = [o for o in offsets if records and o <= records[-1].offset]
                offsets.difference_update(passed)
                gone += [(p, o) for o in passed]
            owed = {p: offsets for p, offsets in owed.items() if offsets}
        return found, gone

    def _expired(self, owed: dict[int, set[int]], partitions) -> list[tuple[int, int]]:
        """Nothing came back: what is owed before its partition's beginning is gone (retention); if nothing
        is, Kafka did not answer, which is an error."""
        start = self._consumer.beginning_offsets([partitions[p] for p in owed])
        expired = [(p, o) for p, offsets in owed.items() for o in offsets if o < start[partitions[p]]]
        if not expired:
            raise TbaError(f"{self.topic} offsets { ({p: sorted(o) for p, o in owed.items()}) } could not be read back")
        for p, o in expired:
            owed[p].discard(o)
        return expired

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
