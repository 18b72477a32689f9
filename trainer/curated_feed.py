"""The replay buffer on Kafka: curated_buffer makes it over the curated topic, and CuratedFeed fills it, live (poll)
or from a past range (fill)."""

from __future__ import annotations

import logging
import threading
import time

from kafka import TopicPartition

from ops import kafka_clients
from ops.acls import READ, one_line_refusals
from ops.config import TbaConfig
from ops.errors import TbaError
from ops.topics import Topic
from trainer.read_back import GroupReader
from trainer.replay_buffer import ReplayBuffer

log = logging.getLogger(__name__)
PROGRESS_S = 5.0  # a long fill says how far it got this often


def curated_buffer(cfg: TbaConfig, curated: Topic, seed: int = 0, admit=None, reject=None) -> ReplayBuffer:
    """The trainer's ReplayBuffer of the curated topic: decoded by its codec, evicted groups read back from the spill
    file or Kafka (trainer/read_back.py); a CuratedFeed fills it."""
    return ReplayBuffer(cfg.buffer, curated.codec, GroupReader(cfg, curated), seed, admit, reject)


class CuratedFeed:
    """Feeds a ReplayBuffer from the curated topic: live (poll), or a past offset/time range (fill)."""

    def __init__(self, cfg: TbaConfig, buffer: ReplayBuffer):
        self.buffer = buffer
        topic = buffer.topic  # the curated Topic its reader reads back from (curated_buffer)
        self.consumer = topic.consumer()
        with one_line_refusals(cfg, READ):
            self.partitions = topic.partitions_in(self.consumer)
        if not self.partitions:
            raise TbaError(f"topic {topic} does not exist; run `tba topics create`")
        self.consumer.assign(self.partitions)
        self.seek(buffer.next_offsets)

    def seek(self, next_offsets: dict[int, int]) -> None:
        """Continue each partition at its next offset to ingest (from the start where none is known)."""
        for tp in self.partitions:
            start = next_offsets.get(tp.partition)
            if start is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, start)

    def poll(self, timeout_ms: int = 100) -> int:
        """Ingest whatever committed groups arrived; returns how many were added."""
        added = 0
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            added += self.buffer.ingest(records)
        return added

    def resolve(self, at: int | None, timestamp_ms: int | None, default: str) -> dict[TopicPartition, int]:
        """Per-partition offsets of an offset bound (same on every partition), a time bound, or start/end."""
        if at is not None:
            return {tp: at for tp in self.partitions}
        if timestamp_ms is not None:
            found = self.consumer.offsets_for_times({tp: timestamp_ms for tp in self.partitions})
            ends = self.consumer.end_offsets(self.partitions)
            return {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in self.partitions}
        edge = self.consumer.beginning_offsets if default == "start" else self.consumer.end_offsets
        return edge(self.partitions)

    def fill(
        self,
        from_offset: int | None = None,
        to_offset: int | None = None,
        from_time_ms: int | None = None,
        to_time_ms: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> int:
        """Ingest the half-open range [from, to) of every partition, by offset or by timestamp (replays).

        The feed then continues where the topic ended when the fill began: a later poll() reads what
        arrived since (live searchers' groups), never what lies between the range and that end.
        Returns how many groups were added; stops early (the range cut short) once stop_event is set.
        """
        start = self.resolve(from_offset, from_time_ms, "start")
        stop = self.resolve(to_offset, to_time_ms, "end")
        ends = self.consumer.end_offsets(self.partitions)
        stop = {tp: min(stop[tp], ends[tp]) for tp in self.partitions}
        ranges = {tp: (start[tp], stop[tp]) for tp in self.partitions if start[tp] < stop[tp]}
        total = sum(end - begin for begin, end in ranges.values())
        added = 0
        began = reported = time.monotonic()
        for batch in self.buffer.topic.read_range(self.consumer, start, stop):
            if time.monotonic() - reported >= PROGRESS_S:
                reported = time.monotonic()
                read = sum(min(self.consumer.position(tp), end) - begin for tp, (begin, end) in ranges.items())
                rate = read / max(reported - began, 1e-6)
                left = (total - read) / rate if rate else float("inf")
                log.info("filling from %s: %d of %d records read, %.0f a second, about %.0f s left (Ctrl-C stops)",
                         self.buffer.topic, read, total, rate, left)  # fmt: skip
            for records in batch.values():
                added += self.buffer.ingest(records)
            if stop_event and stop_event.is_set():  # cut short: the range was not read to its end
                return added
        for tp in self.partitions:
            after = max(self.buffer.next_offsets.get(tp.partition, 0), ends[tp])
            self.buffer.next_offsets[tp.partition] = after  # a checkpoint resumes the feed there too
            self.consumer.seek(tp, after)
        return added

    def close(self) -> None:
        self.consumer.close(timeout_ms=int(kafka_clients.CLOSE_TIMEOUT_S * 1000))
