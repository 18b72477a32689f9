"""A hanging transaction (open on a partition, over as far as its coordinator knows) is found and ended as its
coordinator decided (aborted, or committed when the coordinator had prepared a commit), and read_committed
readers move past it; a live transaction is left alone."""

import contextlib
import json
import logging

from kafka import KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from ops import kafka_clients
from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import end_offsets, read_topic
from ops.transactions import OFFSETS_TOPIC, HangingTransactions, job_partitions, open_transactions
from tba.supervisor import Supervisor

VERIFICATION = "transaction.partition.verification.enable"
HANGING = "hanging"  # the transactional id (in the namespace) of the producer that leaves transactions open


@contextlib.contextmanager
def partitions_unverified(cfg):
    """Brokers stop checking that a transactional write's partition was added to its transaction (KIP-890)."""
    admin = kafka_clients.admin(cfg)
    brokers = [str(b["broker_id"]) for b in admin.describe_cluster()["brokers"]]
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.BROKER, b, {VERIFICATION: "false"}) for b in brokers])
        yield
    finally:
        admin.reset_configs([ConfigResource(ConfigResourceType.BROKER, b, {VERIFICATION: None}) for b in brokers])
        admin.close()


def transaction_unknown_on(cfg, tp: TopicPartition) -> KafkaProducer:
    """A transactional producer, in a transaction, whose writes to tp never tell the coordinator about the
    partition: the partition holds the transaction open and the coordinator will never end it there. That is
    the state a broker that skipped a transaction's markers leaves (README, Reliability), made without a kill."""
    producer = kafka_clients.producer(cfg, transactional_id=f"{cfg.kafka.namespace}.{HANGING}")
    producer.init_transactions()
    producer.begin_transaction()
    manager = producer._transaction_manager
    asking = manager.maybe_add_partition_to_transaction

    def added_without_asking(partition):  # skips AddPartitionsToTxn for tp alone
        if partition != tp:
            return asking(partition)
        with manager._lock:
            manager._partitions_in_transaction.add(partition)

    manager.maybe_add_partition_to_transaction = added_without_asking
    return producer


def leave_hanging(cfg, tp: TopicPartition) -> None:
    """A transaction that never ends: its coordinator has nothing of it (no partition added), so it prepared no
    commit, and it is aborted."""
    producer = transaction_unknown_on(cfg, tp)
    producer.send(tp.topic, b"hanging", partition=tp.partition).get(timeout=20)
    producer.close(timeout=0)


def committed_write(cfg, tp: TopicPartition, value: bytes, writer: str = "writer") -> None:
    producer = kafka_clients.producer(cfg, transactional_id=f"{cfg.kafka.namespace}.{writer}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(tp.topic, value, partition=tp.partition)
    producer.commit_transaction()
    producer.close()


def test_a_hanging_transaction_is_aborted_and_readers_move_past_it(cfg, caplog):
    curated = topic_names(cfg).curated
    hanging_at = TopicPartition(curated, 0)
    with partitions_unverified(cfg):
        leave_hanging(cfg, hanging_at)
    committed_write(cfg, hanging_at, b"after")
    hidden = end_offsets(cfg, [curated], "read_uncommitted")[curated] - end_offsets(cfg, [curated])[curated]
    assert hidden == 3  # the hanging record, the committed one and its marker: read_committed stops at offset 0

    # a live transaction of the filter's kind, on curated and the filter group's offsets, is no hanging one
    live: KafkaProducer = kafka_clients.producer(cfg, transactional_id=f"{cfg.kafka.namespace}.live")
    live.init_transactions()
    live.begin_transaction()
    live.send(curated, b"live", partition=1)
    group = f"{cfg.kafka.namespace}.{cfg.filter.group}"
    consumer = kafka_clients.consumer(cfg, group_id=group)
    live.send_offsets_to_transaction({TopicPartition(curated, 1): OffsetAndMetadata(1, "", -1)},
                                     consumer.group_metadata())  # fmt: skip
    live.flush()
    admin = kafka_clients.admin(cfg)
    opened = {t.partition.topic: t for t in open_transactions(admin, job_partitions(cfg, admin))}
    admin.close()
    assert set(opened) == {curated, OFFSETS_TOPIC}  # job_partitions names the group's offsets partition right

    patient = HangingTransactions(cfg)  # the 60 s grace: nothing is aborted at first sight
    assert patient.heal() == [] and len(patient.first_seen) == 3

    healer = HangingTransactions(cfg, grace_s=0)
    with caplog.at_level(logging.WARNING, logger="ops.transactions"):
        aborted = healer.heal()
    assert [(t.partition, t.start_offset) for t in aborted] == [(hanging_at, 0)]
    assert f"aborted a hanging transaction on {curated}-0 from offset 0" in caplog.text
    assert healer.healed == [str(aborted[0])]
    assert [r.value for r in read_topic(cfg, curated)] == [b"after"]  # the hanging write aborted, the rest seen

    live.commit_transaction()  # untouched by the healer: it commits, and is read
    live.close()
    consumer.close()
    assert sorted(r.value for r in read_topic(cfg, curated)) == [b"after", b"live"]
    assert healer.heal() == []


def test_the_supervisor_aborts_hanging_transactions_as_it_ticks(cfg, tmp_path):
    curated = topic_names(cfg).curated
    with partitions_unverified(cfg):
        leave_hanging(cfg, TopicPartition(curated, 2))
    supervisor = Supervisor(with_overrides(cfg, trainer={"run_dir": str(tmp_path)}, weights={"port": 0}))
    supervisor.transactions.grace_s = 0
    for p in supervisor.processes:
        p.done = "stopped"  # the tick's other work: none
    assert supervisor.tick()
    looking = supervisor.healing  # the look runs beside the tick, which does not wait for Kafka
    looking.join(30)
    supervisor.write_state()
    assert json.loads((tmp_path / "job.json").read_text())["hanging_transactions_healed"] == 1
    assert end_offsets(cfg, [curated]) == end_offsets(cfg, [curated], "read_uncommitted")  # nothing held back
    assert supervisor.tick() and supervisor.healing is looking  # the next look is HEAL_EVERY_S later


def test_a_hanging_transaction_its_coordinator_committed_is_committed(cfg, caplog):
    """The broker's kill -9 case: the coordinator prepared the commit and wrote the markers of some partitions
    only. Aborting the rest would, on the filter group's offsets, have a committed batch read and routed again."""
    curated = topic_names(cfg).curated
    skipped, marked = TopicPartition(curated, 1), TopicPartition(curated, 0)
    with partitions_unverified(cfg):
        producer = transaction_unknown_on(cfg, skipped)
        producer.send(curated, b"skipped marker", partition=skipped.partition).get(timeout=20)
        producer.send(curated, b"marked", partition=marked.partition).get(timeout=20)
        producer.commit_transaction()  # PrepareCommit names curated-0 alone: curated-1 gets no marker
        producer.close()
    assert [r.value for r in read_topic(cfg, curated)] == [b"marked"]

    healer = HangingTransactions(cfg, grace_s=0)
    with caplog.at_level(logging.WARNING, logger="ops.transactions"):
        ended = healer.heal()
    assert [(t.partition, t.start_offset) for t in ended] == [(skipped, 0)]
    assert f"committed a hanging transaction on {curated}-1 from offset 0" in caplog.text
    assert sorted(r.value for r in read_topic(cfg, curated)) == [b"marked", b"skipped marker"]
    assert healer.heal() == []


def test_a_hanging_transaction_of_a_producer_that_committed_there_before_is_ended(cfg):
    """The filter's case after a broker's kill -9: its producer's earlier markers on the partition carry the
    coordinator's epoch, and the partition refuses a marker that does not (TransactionCoordinatorFencedError)."""
    curated = topic_names(cfg).curated
    tp = TopicPartition(curated, 0)
    committed_write(cfg, tp, b"committed", writer=HANGING)  # the same transactional id, as a restarted filter's
    with partitions_unverified(cfg):
        leave_hanging(cfg, tp)
    assert [r.value for r in read_topic(cfg, curated)] == [b"committed"]

    healer = HangingTransactions(cfg, grace_s=0)
    ended = healer.heal()
    assert [(t.partition, t.start_offset) for t in ended] == [(tp, 2)] and healer.failures == {}
    assert end_offsets(cfg, [curated]) == end_offsets(cfg, [curated], "read_uncommitted")  # readers go on
    assert [r.value for r in read_topic(cfg, curated)] == [b"committed"]  # it was aborted
