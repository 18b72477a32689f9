"""The filter consumer group: raw -> scorers -> curated (accepted) or dlq (rejected, with reason).

Consume-transform-produce is exactly-once: each polled batch is one Kafka transaction holding the
curated and dlq records *and* the consumer offsets (KIP-447, fenced by group generation). A crash
mid-batch aborts it; the next owner of the partition re-reads from the last committed offset, and
readers of curated (read_committed) never see the aborted copy. Instances share the raw partitions
as one consumer group; each needs its own `instance` id, which is also its transactional id, so a
restarted instance fences its dead predecessor at once instead of waiting out its transaction; it
is also its static group membership, so the restart gets the same partitions back without a rebalance.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    ProducerFencedError,
)

from consumers.scorers import build_scorers
from ops import kafka_clients
from ops.acls import READ, WRITE, one_line_refusals, refusal
from ops.config import TbaConfig
from ops.errors import BrokerError, DecodeError, TbaError
from ops.job import model_id
from ops.names import filter_group, filter_instance_id
from ops.topics import JobTopics
from schemas.codec import SchemaStore
from schemas.records import DeadLetter, now_ms

log = logging.getLogger(__name__)
ROUTE_BUDGET_S = 10.0  # routing work a transaction takes at most (then it commits what it routed)
# An instance that dies and never returns holds back read_committed readers this long.
TRANSACTION_TIMEOUT_S = 15.0


@dataclass
class FilterStats:
    consumed: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # by scorer name
    transactions: int = 0
    aborts: int = 0


@dataclass(frozen=True)
class Routed:
    """Where one raw record goes: curated with a re-encoded group, or dlq with a dead letter."""

    accepted: bool
    value: bytes
    scorer: str = ""


class GroupFilter:
    """The pure part: raw bytes in, routed bytes out, with the codecs of the topics given (JobTopics over an
    in-memory SchemaStore needs no broker). No Kafka here, so it is testable on its own."""

    def __init__(self, cfg: TbaConfig, topics: JobTopics):
        self.cfg = cfg
        self.codec, self.curated, self.letters = topics.raw.codec, topics.curated.codec, topics.dlq.codec
        self.scorers = build_scorers(cfg.filter)
        self.source = topics.raw.name
        self.model_id = model_id(cfg)
        self._completer = None  # loaded with the first text-only group: most jobs never need a model here

    def route(self, value: bytes | None, key: bytes | None = None, partition: int = -1, offset: int = -1) -> Routed:
        try:
            group = self.codec.decode(value or b"")
        except DecodeError as exc:
            return self._reject("decode", exc.reason, value, key, partition, offset)
        reason = group.foreign_ids(self.model_id)
        if reason:
            return self._reject("model", reason, value, key, partition, offset)
        reason = self._complete(group, group.carries_ids())
        if reason:
            return self._reject("completion", reason, value, key, partition, offset)
        scores = {}
        for name, scorer in self.scorers:
            try:
                verdict = scorer(group)
            except Exception as exc:  # a scorer bug must not stop the stream: the record goes to dlq
                return self._reject(name, f"scorer failed: {type(exc).__name__}: {exc}", value, key, partition, offset)
            if not verdict.accepted:
                return self._reject(name, verdict.reason, value, key, partition, offset)
            scores[name] = verdict.score
        group.scores = {**group.scores, **scores}
        return Routed(True, self.curated.encode(group))

    def _complete(self, group, carries_ids: bool) -> str | None:
        """Fill in what a text-only (or gateway) group lacks, once, so curated holds what the trainer reads;
        the reason when it cannot be done."""
        if self.cfg.trainer.loss != "tb":  # the baselines take samples as the policy's own (ratio 1)
            bare = next((i for i, s in enumerate(group.samples) if s.logprobs.size == 0 and s.completion), None)
            if bare is not None:
                return (f"trainer.loss {self.cfg.trainer.loss} needs behaviour log-probs to weigh a sample; "
                        f"sample {bare} has none")  # fmt: skip
        group.group_id = group.group_id or group.digest().hex()  # a writer may leave naming it to us
        group.created_at = group.created_at or now_ms()
        if not group.missing():
            return None
        if self._completer is None:
            self._completer = load_completer(self.cfg)  # outside the try: a model that cannot load is fatal
        try:
            reason = self._completer.complete(group)
        except Exception as exc:  # a bad chat template for these messages, ...: this group to the dlq, not the filter
            return f"completion failed: {type(exc).__name__}: {str(exc)[:200]}"
        if reason is None and not carries_ids:
            group.model_id = self.model_id  # its ids are now this job's model's, whatever made the text
        return reason

    def _reject(self, scorer: str, reason: str, value, key, partition: int, offset: int) -> Routed:
        letter = DeadLetter(reason, scorer, self.source, partition, offset, key, bytes(value or b""))
        return Routed(False, self.letters.encode(letter), scorer)


def load_completer(cfg: TbaConfig):
    """The job's tokenizer and reference model, as searchers load them (policy.completion.GroupCompleter)."""
    from policy.completion import GroupCompleter
    from policy.models import load_model

    s = cfg.searcher
    reference, tokenizer = load_model(s.reference_model or s.model, None if s.reference_model else s.gguf_file, s.dtype)
    return GroupCompleter(reference, tokenizer, cfg.trainer.temperature)


class FilterConsumer:
    """One member of the filter group. run() until stop is set (or idle_exit_s passes with no input)."""

    def __init__(self, cfg: TbaConfig, instance: str = "0", store: SchemaStore | None = None):
        self.cfg = cfg
        self.topics = JobTopics(cfg, store)
        self.filter = GroupFilter(cfg, self.topics)
        self.stats = FilterStats()
        # Static membership: a restarted instance takes its partitions straight back, no rebalance wait.
        self.transactional_id = filter_instance_id(cfg, instance)
        self.consumer = self.topics.raw.consumer(
            group_id=filter_group(cfg),
            group_instance_id=self.transactional_id,
            max_poll_records=cfg.filter.max_poll_records,
        )
        self.consumer.subscribe([self.topics.raw.name])
        self.producer = self._transactional_producer()
        self._unread: list[TopicPartition] = []  # a batch whose transaction Kafka aborted: read again (_restore)

    def _transactional_producer(self):
        producer = kafka_clients.producer(
            self.cfg, transactional_id=self.transactional_id, transaction_timeout_ms=int(TRANSACTION_TIMEOUT_S * 1000)
        )
        with one_line_refusals(self.cfg, WRITE, transactional_id=self.transactional_id):
            producer.init_transactions()
        return producer

    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> FilterStats:
        stop = stop or threading.Event()
        last_input = time.monotonic()
        while not stop.is_set():
            if self.producer is None:
                self._restore(stop)
                continue
            with one_line_refusals(self.cfg, READ):  # raw, or the group
                batch = self.consumer.poll(timeout_ms=100)
            if batch:
                self._process(batch)
                last_input = time.monotonic()
            elif not self.consumer.assignment():
                last_input = time.monotonic()  # joining the group is not idleness
            elif idle_exit_s is not None and time.monotonic() - last_input > idle_exit_s:
                break
        return self.stats

    def _routed(self, batch: dict[TopicPartition, list]) -> tuple[list, dict[TopicPartition, int]]:
        """(record, Routed) in order until ROUTE_BUDGET_S is spent, and where each partition's unrouted rest begins.

        Routed before the transaction opens, and in bounded time: completing a text-only group is a model pass,
        and a poll of hundreds of them must outlast neither the transaction timeout nor the poll interval."""
        deadline = time.monotonic() + ROUTE_BUDGET_S
        outs, rest = [], {}
        for tp, records in batch.items():
            for rec in records:
                if outs and time.monotonic() > deadline:
                    rest[tp] = rec.offset
                    break
                outs.append((tp, rec, self.filter.route(rec.value, rec.key, tp.partition, rec.offset)))
        return outs, rest

    def _process(self, batch: dict[TopicPartition, list]) -> None:
        outs, rest = self._routed(batch)
        opened = time.monotonic()
        self.producer.begin_transaction()
        try:
            routed = Counter()
            sends = []
            for _, rec, out in outs:
                topic = self.topics.curated if out.accepted else self.topics.dlq
                # keep the generation time: curated time ranges (replays) then mean when groups were made
                sends.append(topic.send(self.producer, out.value, rec.key, timestamp_ms=rec.timestamp))
                routed["accepted" if out.accepted else out.scorer] += 1
            # a send that fails past its delivery timeout leaves kafka-python's transaction committable
            # (the Java client aborts it): wait for every send, and abort unless all were written
            self.producer.flush()
            failed = [f.exception for f in sends if f.failed()]
            denied = [exc for exc in failed if isinstance(exc, AuthorizationError)]
            if denied:
                raise denied[0]
            if failed:
                raise KafkaError(f"{len(failed)} of {len(sends)} sends failed, first: {failed[0]}")
            done = {tp: rec.offset + 1 for tp, rec, _ in outs}  # the last routed of each partition, + 1
            offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in done.items()}
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
            self.producer.commit_transaction()
            self.stats.consumed += len(sends)  # counted once committed: an aborted batch is read again
            self.stats.accepted += routed.pop("accepted", 0)
            self.stats.rejected.update(routed)
            self.stats.transactions += 1
            for tp, offset in rest.items():  # what the time budget left is fetched again, for the next one
                self.consumer.seek(tp, offset)
        except ProducerFencedError as exc:
            self._fenced(exc, time.monotonic() - opened, batch)
            self.stats.aborts += 1
        except AuthorizationError as exc:  # re-reading cannot help: stop with the one line saying who may
            with contextlib.suppress(KafkaError):  # a refused transactional id leaves nothing to abort
                self.producer.abort_transaction()
            raise refusal(self.cfg, exc, READ if isinstance(exc, GroupAuthorizationFailedError) else WRITE) from exc
        except KafkaError as exc:
            # e.g. a rebalance took the partitions away mid-batch: abort, re-read from committed offsets
            log.warning("filter transaction aborted, re-reading the batch: %s", exc)
            self.stats.aborts += 1
            try:
                self.producer.abort_transaction()
            except KafkaError as failed:  # fenced, or stuck bumping its epoch: see _fenced
                self._fenced(failed, time.monotonic() - opened, batch)
                return
            if isinstance(exc, CommitFailedError):  # the group no longer knows this member (expelled while Kafka
                # was away): re-reading with the same stale membership fails the same way, batch after batch, until
                # a heartbeat notices; join again now, then read on from the committed offsets
                self.consumer.unsubscribe()
                self.consumer.subscribe([self.topics.raw.name])
                return
            self._rewind(list(batch))

    def _fenced(self, exc: KafkaError, open_s: float, batch: dict[TopicPartition, list]) -> None:
        """The transaction's producer can neither commit nor abort. Open past its timeout (Kafka away meanwhile),
        the transaction was aborted by its coordinator, which bumped the producer epoch and so fenced this
        producer as a newer instance would: once Kafka answers, a new producer takes the epoch back and the batch
        is read again (_restore). Sooner, only another instance with this one's id fences it (and would again)."""
        if open_s < TRANSACTION_TIMEOUT_S:
            if isinstance(exc, ProducerFencedError):
                raise TbaError(
                    f"filter instance fenced: another filter uses the same instance id ({exc}); "
                    "give each a distinct --instance"
                ) from exc
            raise exc
        log.warning("filter transaction open %.0fs, past its %.0fs timeout: aborted by Kafka (%s); a new producer "
                    "will read the batch again", open_s, TRANSACTION_TIMEOUT_S, exc)  # fmt: skip
        self.producer.close(timeout=0)
        self.producer = None
        self._unread = list(batch)

    def _restore(self, stop: threading.Event) -> None:
        """The aborted batch's partitions back at their committed offsets (the group coordinator answering),
        then a new producer; Kafka still away, tried again (a stop meanwhile ends the filter: see `tba filter`)."""
        try:
            self._rewind(self._unread)
            self._unread = []
            self.producer = self._transactional_producer()
        except (KafkaError, BrokerError) as exc:  # BrokerError: no broker answered the new producer in time
            log.warning("filter waiting for Kafka to read an aborted batch again: %s", exc)
            stop.wait(1.0)

    def _rewind(self, partitions: list[TopicPartition]) -> None:
        assigned = self.consumer.assignment()
        for tp in partitions:
            if tp in assigned:
                committed = self.consumer.committed(tp)
                if committed is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)

    def close(self) -> None:
        try:
            self.consumer.close(timeout_ms=int(kafka_clients.CLOSE_TIMEOUT_S * 1000))
        finally:
            if self.producer is not None:
                self.producer.close(timeout=kafka_clients.CLOSE_TIMEOUT_S)
