"""Hanging transactions: open on a partition while their coordinator does not have them open, so
nobody will ever end them.

A single broker's kill -9 can leave one of the filter's (README, Reliability): the restarted broker
skips a committing transaction's markers for partitions whose leader it does not know yet. Until the
transaction is aborted, read_committed readers of curated and the dlq stop at it, and on
__consumer_offsets the filter group's committed offsets stay pending, so the group waits on that raw
partition. This finds them as `kafka-transactions.sh find-hanging` does (DescribeProducers on the
partitions, then the coordinator's ListTransactions and DescribeTransactions) and ends each with the
markers its coordinator decided (WriteTxnMarkers, as that tool's `abort` does), through kafka-python's
admin client: no JVM to start per look.

Ending one the way its coordinator decided is what keeps the filter exactly-once across a broker kill -9:
the skipped markers are a commit's, and aborting the filter group's offsets of a committed transaction
would have its batch read and routed again. The decision is in `__transaction_state`: the coordinator
writes PrepareCommit or PrepareAbort there (with the producer id and epoch) before it sends a marker, so a
transaction with no Prepare record after its first write was never committed and is aborted.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import AbortTransactionSpec, TransactionState
from kafka.errors import KafkaError, TransactionalIdNotFoundError

from ops import kafka_clients
from ops.config import TbaConfig
from ops.names import filter_group, topic_names
from ops.topics import UNCOMMITTED, read_topic

log = logging.getLogger(__name__)
OFFSETS_TOPIC = "__consumer_offsets"
TRANSACTION_LOG = "__transaction_state"
PREPARE_COMMIT, PREPARE_ABORT = 2, 3  # TransactionLogValue.TransactionStatus
# states in which a coordinator will still write the transaction's markers itself
ACTIVE = {TransactionState.ONGOING, TransactionState.PREPARE_COMMIT, TransactionState.PREPARE_ABORT,
          TransactionState.PREPARE_EPOCH_FENCE}  # fmt: skip


@dataclass(frozen=True)
class OpenTransaction:
    partition: TopicPartition
    producer_id: int
    producer_epoch: int
    start_offset: int
    coordinator_epoch: int  # of the last marker this producer had on the partition: a marker below it is fenced

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
    names = topic_names(cfg)  # the admin describes them by name
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
        OpenTransaction(tp, p.producer_id, p.producer_epoch, p.current_transaction_start_offset, p.coordinator_epoch)
        for tp, state in admin.describe_producers(partitions).items()
        for p in state.active_producers
        if p.current_transaction_start_offset >= 0
    }


def transactional_ids(admin: KafkaAdminClient, txns: list[OpenTransaction]) -> dict[int, str]:
    """producer id -> transactional id, for those the coordinators still list."""
    if not txns:
        return {}
    listings = admin.list_transactions(producer_id_filters=sorted({t.producer_id for t in txns}))
    return {t.producer_id: t.transactional_id for per_broker in listings.values() for t in per_broker}


def _uvarint(buf: io.BytesIO) -> int:
    value = shift = 0
    while True:
        byte = buf.read(1)[0]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value


def transaction_log_entry(key: bytes, value: bytes | None) -> tuple[str, int, int, int, int] | None:
    """(transactional id, producer id, producer epoch, status, last update ms) of a __transaction_state record
    (TransactionLogKey v0, TransactionLogValue v0 or v1); None for a tombstone."""
    if value is None:
        return None
    (length,) = struct.unpack_from(">h", key, 2)
    transactional_id = key[4 : 4 + length].decode()
    buf = io.BytesIO(value)
    (version,) = struct.unpack(">h", buf.read(2))
    producer_id, epoch, _timeout_ms, status = struct.unpack(">qhib", buf.read(15))
    if version == 0:  # arrays and strings with fixed-width lengths
        for _ in range(struct.unpack(">i", buf.read(4))[0]):
            buf.read(struct.unpack(">h", buf.read(2))[0])
            buf.read(4 * struct.unpack(">i", buf.read(4))[0])
    else:  # flexible: compact arrays and strings (length + 1 as an unsigned varint), each element's tagged fields
        for _ in range(_uvarint(buf) - 1):
            buf.read(_uvarint(buf) - 1)
            buf.read(4 * (_uvarint(buf) - 1))
            for _ in range(_uvarint(buf)):
                _uvarint(buf)
                buf.read(_uvarint(buf))
    (last_update_ms,) = struct.unpack(">q", buf.read(8))
    return transactional_id, producer_id, epoch, status, last_update_ms


def first_write_ms(cfg: TbaConfig, txn: OpenTransaction) -> int:
    """The timestamp of the transaction's first record on its partition (it is open: read uncommitted)."""
    consumer = kafka_clients.consumer(cfg, isolation_level=UNCOMMITTED)
    try:
        consumer.assign([txn.partition])
        consumer.seek(txn.partition, txn.start_offset)
        deadline = time.monotonic() + cfg.kafka.client_timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=1).values():
                return records[0].timestamp
        raise TimeoutError(f"no record at {txn} within kafka.client_timeout_s")
    finally:
        consumer.close()


def transaction_log(cfg: TbaConfig) -> list[tuple[str, int, int, int, int]]:
    """The decoded records of __transaction_state, oldest first per partition (tombstones left out)."""
    records = read_topic(cfg, TRANSACTION_LOG, isolation=UNCOMMITTED)
    return [entry for r in records if (entry := transaction_log_entry(r.key, r.value)) is not None]


def committed_by_coordinator(cfg: TbaConfig, txn: OpenTransaction, transactional_id: str | None, entries) -> bool:
    """Whether the transaction's coordinator decided to commit it: the first PrepareCommit or PrepareAbort of its
    producer id (at its epoch, or the next: transactions v2 bump the epoch as they end) since its first write,
    in entries (transaction_log())."""
    if transactional_id is None:
        return False  # no coordinator lists it: nothing can have been decided for it
    since = first_write_ms(cfg, txn)
    for entry_id, producer_id, epoch, status, updated_ms in entries:
        mine = entry_id == transactional_id and producer_id == txn.producer_id
        if mine and epoch in (txn.producer_epoch, txn.producer_epoch + 1) and updated_ms >= since:
            if status in (PREPARE_COMMIT, PREPARE_ABORT):
                return status == PREPARE_COMMIT
    return False


def end_transaction(admin: KafkaAdminClient, txn: OpenTransaction, commit: bool) -> None:
    """Write the transaction's marker on its partition: abort as kafka-python's admin does (WriteTxnMarkers to
    the partition's leader), or the same request with the commit result."""
    spec = AbortTransactionSpec(txn.partition, txn.producer_id, txn.producer_epoch, txn.coordinator_epoch)
    if not commit:
        admin.abort_transaction(spec)
        return

    async def write_commit():
        leaders = await admin._async_get_leader_for_partitions([txn.partition])
        request = admin._abort_transaction_request(spec)
        request.markers[0].transaction_result = True  # True: COMMIT
        admin._abort_transaction_process_response(await admin._manager.send(request, node_id=next(iter(leaders))), spec)

    admin._manager.run(write_commit)


def unknown_to_coordinator(admin: KafkaAdminClient, txns: list[OpenTransaction]) -> list[OpenTransaction]:
    """Those whose coordinator does not have them open on their partition: it will never end them."""
    if not txns:
        return []
    ids = transactional_ids(admin, txns)
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
        self.failures: dict[str, str] = {}  # a hanging transaction -> why the last try to end it failed

    def find(self, admin: KafkaAdminClient) -> list[OpenTransaction]:
        """One look (a few admin requests): the open transactions past their grace that no coordinator has."""
        now = time.monotonic()
        open_now = open_transactions(admin, job_partitions(self.cfg, admin))
        self.first_seen = {t: self.first_seen.get(t, now) for t in open_now}
        return unknown_to_coordinator(admin, [t for t, seen in self.first_seen.items() if now - seen >= self.grace_s])

    def heal(self) -> list[OpenTransaction]:
        """Ends what hangs as its coordinator decided, saying so in the log; returns those ended."""
        admin = kafka_clients.admin(self.cfg)
        try:
            hanging = self.find(admin)
            ids = transactional_ids(admin, hanging)
            entries = transaction_log(self.cfg) if hanging else []  # one read of the log for all of them
            ended = []
            for txn in hanging:  # each on its own: one that cannot be ended now must not hold up the others
                try:
                    commit = committed_by_coordinator(self.cfg, txn, ids.get(txn.producer_id), entries)
                    end_transaction(admin, txn, commit)
                except (KafkaError, OSError) as exc:
                    self.failures[str(txn)] = repr(exc)
                    log.warning("could not end the hanging transaction on %s (tried again next look): %r", txn, exc)
                    continue
                ended.append(txn)
                self.failures.pop(str(txn), None)
                log.warning(
                    "%s a hanging transaction on %s: open there for over %.0fs and unknown to its coordinator, "
                    "which had decided to %s it; readers go on past it",
                    "committed" if commit else "aborted", txn, self.grace_s, "commit" if commit else "abort",
                )  # fmt: skip
                self.healed.append(str(txn))
                self.first_seen.pop(txn)
            return ended
        finally:
            admin.close()
