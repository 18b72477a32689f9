"""GroupReader: curated records read back by (partition, offset), for the replay buffer's groups that are
no longer decoded in memory: from the SpillFile of records already read when they are there, else Kafka.

From Kafka: a fetch asks each partition for one position, so every partition that owes records is
sought at its next one and they are fetched together; records are taken one at a time, so the rest of a
fetched batch is never decoded (decoding neighbours was most of a read's cost). Each record still costs a
fetch (~4 ms here), which is why the spill file exists; more consumers in parallel threads did not read
faster. ReplayBuffer.prefetch hides what reading is left behind a training step.
"""

from __future__ import annotations

import threading
import time

from kafka import TopicPartition
from kafka.errors import KafkaError

from ops.config import TbaConfig
from ops.errors import TbaError
from ops.topics import Topic
from trainer.spill_file import SpillFile

READ_BACK_BYTES = 64 * 1024  # per partition and request: a few record batches (measured faster than 16 or 256 KiB)
# a poll that brings nothing this long asks where each partition begins: retention may have emptied it,
# and an emptied partition never answers a fetch (a draw waited the whole client timeout for it)
RETENTION_LOOK_S = 1.0


class GroupReader:
    """Reads one topic's records back by (partition, offset); ReplayBuffer's reader of the curated topic."""

    def __init__(self, cfg: TbaConfig, topic: Topic):
        self.cfg = cfg
        self.topic = topic
        self._consumer = None
        self._lock = threading.Lock()  # a prefetch reads on its own thread; a consumer serves one at a time
        spill_bytes = int(cfg.buffer.spill_gb * 2**30)
        self.spill = SpillFile(cfg.buffer.spill_dir, spill_bytes) if spill_bytes else None

    def keep(self, records) -> None:
        """(partition, offset, value)s just read from Kafka, kept to be read back from the spill file."""
        if self.spill is not None:
            self.spill.keep(records)

    def read(self, wanted: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], bytes], list[tuple[int, int]]]:
        """The record values at these (partition, offset)s, and those Kafka no longer holds (retention or
        compaction removed them)."""
        found: dict[tuple[int, int], bytes] = {}
        if self.spill is not None:
            found = {(p, o): v for p, o in wanted if (v := self.spill.get(p, o)) is not None}
        owed: dict[int, list[int]] = {}
        for p, o in sorted(set(wanted) - found.keys()):
            owed.setdefault(p, []).append(o)
        if not owed:
            return found, []
        with self._lock:
            if self._consumer is None:  # made on first use: most buffers never read anything back
                self._consumer = self.topic.consumer(max_partition_fetch_bytes=READ_BACK_BYTES)
            read, gone = self._read(owed)
        self.keep((p, o, value) for (p, o), value in read.items())
        return found | read, gone

    def _read(self, owed: dict[int, list[int]]):
        """Each partition is sought at its next owed offset as soon as the one before arrives, and kafka-python
        fetches every partition that has nothing buffered in one request: a partition never waits for the
        others. Records are taken one at a time because a fetched batch is decoded lazily: the records after
        the one sought are never parsed (they were most of the cost), unless they are owed too."""
        consumer = self._consumer
        found: dict[tuple[int, int], bytes] = {}
        gone: list[tuple[int, int]] = []
        partitions = {p: TopicPartition(self.topic.name, p) for p in owed}
        self._seek(owed, partitions)
        deadline = time.monotonic() + self.cfg.kafka.client_timeout_s
        look = time.monotonic() + RETENTION_LOOK_S
        while owed:
            batch = consumer.poll(timeout_ms=max(0.0, min(look, deadline) - time.monotonic()) * 1000, max_records=1)
            if not batch and time.monotonic() >= look:  # nothing came: retention, or no answer yet
                expired = self._expired(owed, partitions, time.monotonic() >= deadline)
                gone += expired
                look = time.monotonic() + RETENTION_LOOK_S
                if expired:
                    deadline = time.monotonic() + self.cfg.kafka.client_timeout_s
            for tp, records in batch.items():
                offsets, rec = owed[tp.partition], records[0]
                if offsets[0] == rec.offset:
                    found[(tp.partition, rec.offset)] = rec.value
                # the first record at or after the offset sought: owed offsets it passed over are gone
                gone += [(tp.partition, o) for o in offsets if o < rec.offset]
                offsets[:] = [o for o in offsets if o > rec.offset]
                if not offsets:
                    del owed[tp.partition]
                    if owed:  # unassigned, the rest of its batch is dropped unread
                        consumer.assign([partitions[p] for p in owed])
                elif offsets[0] != rec.offset + 1:
                    consumer.seek(tp, offsets[0])
        return found, gone

    def _expired(self, owed: dict[int, list[int]], partitions, timed_out: bool) -> list[tuple[int, int]]:
        """Nothing came back: what is owed before its partition's beginning is gone (retention); if nothing
        is by the client timeout, Kafka did not answer, which is an error. The rest are sought again."""
        try:
            start = self._consumer.beginning_offsets([partitions[p] for p in owed])
        except KafkaError:
            if timed_out:
                raise
            return []  # Kafka away for a moment: the client timeout decides
        expired = [(p, o) for p, offsets in owed.items() for o in offsets if o < start[partitions[p]]]
        if not expired:
            if timed_out:
                raise TbaError(f"{self.topic} offsets {owed} could not be read back")
            return []
        for p in list(owed):
            owed[p] = [o for o in owed[p] if o >= start[partitions[p]]]
            if not owed[p]:
                del owed[p]
        if owed:
            self._seek(owed, partitions)
        return expired

    def _seek(self, owed: dict[int, list[int]], partitions) -> None:
        """Assign the partitions that owe records, each sought at its first owed offset."""
        self._consumer.assign([partitions[p] for p in owed])
        for p, offsets in owed.items():
            self._consumer.seek(partitions[p], offsets[0])

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
