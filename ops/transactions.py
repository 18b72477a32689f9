"""Hanging transactions: open on a partition while their coordinator does not have them open, so
nobody will ever end them.

A single broker's kill -9 can leave one of the filter's (README, Reliability): the restarted broker
skips a committing transaction's markers for partitions whose leader it does not know yet. Until the
transaction is aborted, read_committed readers of curated and the dlq stop at it, and on
__consumer_offsets the filter group's committed offsets stay pending, so the group waits on that raw
partition. This finds them as `kafka-transactions.sh find-hanging` does (DescribeProducers on the
partitions, then the coordinator's ListTransactions and DescribeTransactions) and aborts them as its
`abort` does (WriteTxnMarkers), through kafka-python's admin client: no JVM to start per look.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import AbortTransactionSpec, TransactionState
from kafka.errors import TransactionalIdNotFoundError

from ops import kafka_clients
from ops.config import TbaConfig
from ops.topics import filter_group, topic_names

log = logging.getLogger(__name__)
OFFSETS_TOPIC = "__consumer_offsets"
# states in which a coordinator will still write the transaction's markers itself
ACTIVE = {TransactionState.ONGOING, TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT,
          TransactionState.PREPARE_EPOCH_FENCE}  # fmt: skip


@dataclass(frozen=True)
class OpenTransaction:
    partition: TopicPartition
    producer_id: int
    producer_epoch: int
    start_offset: int

    def __str__(self) -> str:
        tp = self.partition
        return f"{tp.topic}-{tp.partition} from offset {self.start_offset} (producer id {self.producer_id})"


def offsets_partition(group: str, partitions: int) -> int:
    """The __consumer_offsets partition holding a group's offsets: Kafka's abs(String.hashCode) % partitions."""
    units = group.encode("utf-16-be")  # Java hashes UTF-16 code units
    h = 0
    for i in range(0, len(units), 2):
        h = (31 * h + int.from_bytes(units[i : i + 2], "big")) & 0xFFFFFFFF
    h = h - (1 << 32) if h >= 1 << 31 else h
    return 0 if h == -(1 << 31) else abs(h) % partitions


def job_partitions(cfg: TbaConfig, admin: KafkaAdminClient) -> list[TopicPartition]:
    """Where the filter's transactions write: curated, the dlq, and its group's __consumer_offsets partition."""
    names = topic_names(cfg)
    parts = []
    for meta in admin.describe_topics([names.curated, names.dlq, OFFSETS_TOPIC]):
        indexes = [p["partition_index"] for p in meta["partitions"]]
        if meta["name"] == OFFSETS_TOPIC:
            indexes = [offsets_partition(filter_group(cfg), len(indexes))] if indexes else []
        parts += [TopicPartition(meta["name"], i) for i in indexes]
    return parts


def open_transactions(admin: KafkaAdminClient, partitions: list[TopicPartition]) -> set[OpenTransaction]:
    """Every transaction the partitions' leaders hold open."""
    return {
        OpenTransaction(tp, p.producer_id, p.producer_epoch, p.current_transaction_start_offset)
        for tp, state in admin.describe_producers(partitions).items()
        for p in state.active_producers
        if p.current_transaction_start_offset >= 0
    }


def unknown_to_coordinator(admin: KafkaAdminClient, txns: list[OpenTransaction]) -> list[OpenTransaction]:
    """Those whose coordinator does not have them open on their partition: it will never end them."""
    if not txns:
        return []
    listings = admin.list_transactions(producer_id_filters=sorted({t.producer_id for t in txns}))
    ids = {t.producer_id: t.transactional_id for per_broker in listings.values() for t in per_broker}
    descriptions = {}
    for transactional_id in set(ids.values()):
        try:
            descriptions.update(admin.describe_transactions([transactional_id]))
        except TransactionalIdNotFoundError:
            pass  # expired meanwhile: the coordinator knows nothing of it

    def known(txn: OpenTransaction) -> bool:
        d = descriptions.get(ids.get(txn.producer_id))
        same = d is not None and d.producer_id == txn.producer_id
        return same and d.state in ACTIVE and txn.partition in d.topic_partitions

    return [t for t in txns if not known(t)]


class HangingTransactions:
    """Finds the job's hanging transactions and aborts them; heal() once in a while.

    A transaction counts only once it has been seen open at the same start offset for grace_s: far
    beyond the filter's 15 s transaction timeout, after which a coordinator that knows it aborts it
    itself. So a transaction that a coordinator is just ending is never taken for a hanging one.
    """

    def __init__(self, cfg: TbaConfig, grace_s: float = 60.0):
        self.cfg = cfg
        self.grace_s = grace_s
        self.first_seen: dict[OpenTransaction, float] = {}
        self.healed: list[str] = []

    def find(self, admin: KafkaAdminClient) -> list[OpenTransaction]:
        """One look (a few admin requests): the open transactions past their grace that no coordinator has."""
        now = time.monotonic()
        open_now = open_transactions(admin, job_partitions(self.cfg, admin))
        self.first_seen = {t: self.first_seen.get(t, now) for t in open_now}
        return unknown_to_coordinator(admin, [t for t, seen in self.first_seen.items() if now - seen >= self.grace_s])

    def heal(self) -> list[OpenTransaction]:
        """Aborts what hangs, saying so in the log; returns those aborted."""
        admin = kafka_clients.admin(self.cfg)
        try:
            hanging = self.find(admin)
            for txn in hanging:
                admin.abort_transaction(AbortTransactionSpec(txn.partition, txn.producer_id, txn.producer_epoch))
                log.warning(
                    "aborted a hanging transaction on %s: open there for over %.0fs and unknown to its coordinator, "
                    "so nothing else would end it; readers go on past it", txn, self.grace_s,
                )  # fmt: skip
                self.healed.append(str(txn))
                self.first_seen.pop(txn)
            return hanging
        finally:
            admin.close()
