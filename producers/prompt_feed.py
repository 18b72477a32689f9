"""The prompts topic and the searchers' consumer group over it.

`<ns>.prompts` holds one Prompt record per prompt (schemas/prompt.avsc, policy/tasks/prompts.py), written once
per job from the task's training split (seed_prompts, by whichever searcher starts first) or by
`tba prompts load FILE.jsonl` from any source. Searchers form the consumer group `<ns>.searchers`
over it: Kafka's group coordinator gives each member some of the topic.partitions partitions, takes
them back when a member leaves (close) or dies (session timeout) and hands them to the others. There
is no coordinator of ours, so more searchers than partitions leaves the extra ones idle.

A member that has read every partition it holds to the end seeks them back to the beginning: the
next epoch. It commits a partition's offset only after the groups of the prompts read from it are
acknowledged in raw, so a member that dies leaves the prompts since its last commit to the next
owner: redone, never lost.
"""

from __future__ import annotations

import logging
import time

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ops import kafka_clients
from ops.errors import BrokerError
from ops.names import prompts_seed_id, searcher_client_id, searcher_group
from ops.topics import Topic
from policy.tasks import Problem
from policy.tasks.prompts import problem_from_record, problem_record

log = logging.getLogger(__name__)


def publish_prompts(prompts: Topic, problems: list[Problem]) -> int:
    """Append problems to the prompts topic (keyed by prompt id), acknowledged; returns how many."""
    timeout = prompts.cfg.kafka.client_timeout_s
    producer = kafka_clients.producer(prompts.cfg)
    try:
        _send(prompts, producer, problems)
        producer.flush(timeout=timeout)
    finally:
        producer.close(timeout=timeout)
    return len(problems)


def _send(prompts: Topic, producer, problems: list[Problem]) -> None:
    for p in problems:
        prompts.produce(producer, problem_record(p), key=p.prompt_id.encode())


def has_prompts(prompts: Topic) -> bool:
    """Whether the prompts topic holds any committed record (aborted seeds do not count)."""
    consumer = prompts.consumer()
    try:
        parts = prompts.partitions_in(consumer)
        consumer.assign(parts)
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        return any(any(batch.values()) for batch in prompts.read_range(consumer, begin, end, max_records=1))
    finally:
        consumer.close()


def seed_prompts(prompts: Topic, problems: list[Problem]) -> int:
    """Write problems to the prompts topic if it holds none yet; returns how many were written (0: it had some).

    In one transaction of a job-wide transactional id: a second searcher seeding at the same time
    fences the first (whose open transaction is aborted) and checks again, so the topic gets one copy."""
    cfg = prompts.cfg
    producer = kafka_clients.producer(cfg, transactional_id=prompts_seed_id(cfg))
    try:
        producer.init_transactions()
        if has_prompts(prompts):
            return 0
        producer.begin_transaction()
        _send(prompts, producer, problems)
        producer.commit_transaction()
        log.info("wrote the task's %d training prompts to %s", len(problems), prompts.name)
        return len(problems)
    except KafkaError as exc:  # fenced: another searcher seeds (or has seeded) them
        log.info("prompts not seeded here (%s): another searcher does it", type(exc).__name__)
        return 0
    finally:
        producer.close(timeout=cfg.kafka.client_timeout_s)


class PromptFeed(ConsumerRebalanceListener):
    """One searcher's membership of the searchers' group: take() prompts, commit() once their groups are acked."""

    def __init__(self, prompts: Topic, member: str, wait_s: float = 2.0):
        cfg = prompts.cfg
        self.topic = prompts
        self.member = member
        self.wait_s = wait_s
        # dynamic membership: a searcher that stops gives its partitions back at once (LeaveGroup)
        self.consumer = prompts.consumer(group_id=searcher_group(cfg), client_id=searcher_client_id(cfg, member))
        # the topic's partitions known before joining: a group leader without them assigns nothing, and
        # kafka-python may not look again for minutes (metadata_max_age_ms)
        if not self.consumer.partitions_for_topic(prompts.name):
            self.consumer.close()
            raise BrokerError(f"no topic {prompts.name} at {cfg.kafka.bootstrap}: create the job's topics "
                              "(`tba topics create`, or `tba run` does it)")  # fmt: skip
        self.consumer.subscribe([prompts.name], listener=self)
        self.pending: dict[TopicPartition, int] = {}  # next offset to commit, per partition taken from
        self.held: frozenset[TopicPartition] = frozenset()  # as of the last rebalance (for anyone watching)
        self.epochs = 0  # times this member wrapped around the partitions it holds

    def on_partitions_revoked(self, revoked) -> None:
        # the next owner starts at the last commit: what was taken from these since is redone there
        for tp in revoked:
            self.pending.pop(tp, None)
        self.held = self.held - set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        self.held = frozenset(assigned)
        log.info("%s holds prompts partitions %s", self.member, sorted(tp.partition for tp in assigned))

    def take(self, n: int) -> list[Problem]:
        """Up to n prompts from the partitions this member holds, waiting up to wait_s; [] while it holds none."""
        out: list[Problem] = []
        deadline = time.monotonic() + self.wait_s
        while len(out) < n and time.monotonic() < deadline:
            batches = self.consumer.poll(timeout_ms=200, max_records=n - len(out))
            for tp, records in batches.items():
                out += [problem_from_record(self.topic.codec.decode(r.value)) for r in records]
                self.pending[tp] = records[-1].offset + 1
            if len(out) < n:
                self._wrap_at_end()
        return out

    def idle(self) -> None:
        """Take part in the group without taking prompts (while the searcher pauses for policy lag): a member
        that did not poll would hold up every rebalance, and so every other searcher, until it did.

        It does not pause() its partitions: kafka-python (3.0.12) parks a paused partition's records that
        were already fetched and, after resume(), gives them back only when no other partition's records are
        in line, which after a rebalance in this poll may never happen; meanwhile it never fetches that
        partition again, so this member never reaches its end and never wraps to the next epoch."""
        for tp, records in self.consumer.poll(timeout_ms=500, max_records=1).items():
            self.consumer.seek(tp, records[0].offset)  # not served: read it again when generating again

    def _wrap_at_end(self) -> None:
        """Once every held partition is read to its end, start them all again from the beginning."""
        held = self.consumer.assignment()
        if not held:
            return
        end = self.consumer.end_offsets(list(held))
        if all(self.consumer.position(tp) >= end[tp] for tp in held):
            self.consumer.seek_to_beginning(*held)
            self.epochs += 1

    def commit(self) -> None:
        """Commit what was taken (call once its groups are acked in raw); a failed commit means redone work."""
        held = self.consumer.assignment()
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self.pending.items() if tp in held}
        self.pending.clear()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance moved them meanwhile, or Kafka is away: the owner redoes them
            log.warning("%s: prompts offsets not committed (%s); their next owner redoes them", self.member, exc)

    def close(self) -> None:
        self.consumer.close()  # leaves the group: the others take its partitions now, not at session timeout
