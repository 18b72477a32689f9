"""Re-driving the dead-letter topic: send rejected records' original bytes back to raw, once each.

After a scorer is fixed or relaxed, `tba filter --redrive [--scorer NAME]` puts the dead letters
(of that scorer, or of all) back in front of the filter group, which scores them again. How far
re-driving got is kept per scorer, as the committed offset of a consumer group on the dlq
(`<ns>.redrive.<scorer>`), so a letter is never re-driven twice, whichever selection sent it.
"""

from __future__ import annotations

import logging

from kafka import OffsetAndMetadata, TopicPartition

from consumers import scorers
from ops import kafka_clients
from ops.errors import DecodeError
from ops.names import redrive_group
from ops.topics import JobTopics

log = logging.getLogger(__name__)
# what a dead letter's scorer can be: the filter's fixed checks (completing a text-only group among them), its
# configurable scorers, the trainer's admission. Not the gateway's: a group whose rewards never came has none
SCORERS = ("decode", "model", "completion", *scorers.SCORERS, "trainer")


def redrive(topics: JobTopics, scorer: str | None = None) -> int:
    """Re-send the dead letters not re-driven before (only `scorer`'s, if given); returns how many."""
    cfg = topics.cfg
    tp = TopicPartition(topics.dlq.name, 0)
    selected = SCORERS if scorer is None else (scorer,)
    groups = {s: redrive_group(cfg, s) for s in selected}
    admin = kafka_clients.admin(cfg)
    producer = kafka_clients.producer(cfg)
    try:
        committed = admin.list_group_offsets({g: [tp] for g in groups.values()})
        done = {s: committed.get(g, {}).get(tp, OffsetAndMetadata(-1, "", -1)).offset for s, g in groups.items()}
        records = topics.dlq.read()
        end = records[-1].offset + 1 if records else 0
        pending = []
        for rec, letter in topics.dlq.decoded(records):
            if isinstance(letter, DecodeError):  # anyone may write the dlq: not a letter of ours, nothing to re-send
                log.warning("dlq %d:%d is no dead letter (%s): passed over", rec.partition, rec.offset, letter)
                continue
            if letter.scorer in done and rec.offset >= done[letter.scorer]:
                pending.append(topics.raw.send(producer, letter.value, letter.key))
        for future in pending:
            future.get(timeout=cfg.kafka.client_timeout_s)  # raises if Kafka did not take one: nothing committed
        for group in groups.values():  # only once every re-sent letter is acknowledged
            admin.alter_group_offsets(group, {tp: OffsetAndMetadata(end, "", -1)})
        return len(pending)
    finally:
        producer.close()
        admin.close()
