"""`tba tail TOPIC`: a topic's records decoded, one line each (or one JSON object each), from an offset, a time or
the last few of each partition, and with --follow what arrives after. What a user reaches for first to see where a
group went: raw, curated, the dlq (the reason, the scorer, and the rejected record itself), policy versions and
prompts; bytes its codec cannot read are shown as such, never skipped."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np

from ops.config import TbaConfig
from ops.errors import DecodeError, TbaError
from ops.names import topic_names
from ops.topics import JobTopics, Topic
from schemas.records import DeadLetter, TrajectoryGroup

TOPICS = ("raw", "curated", "dlq", "policy_versions", "prompts")


def lines(cfg: TbaConfig, name: str, start: dict, last: int, follow: bool, json_lines: bool,
          stop: threading.Event) -> Iterator[str]:  # fmt: skip
    """What `tba tail` prints: see records() for which records."""
    topics = JobTopics(cfg)
    short = {v: k for k, v in vars(topic_names(cfg)).items()}.get(name, name.replace("-", "_"))
    if short not in TOPICS:
        raise TbaError(f"no topic {name!r} in this job: one of {', '.join(TOPICS)} (or its full name)")
    for rec, value in records(getattr(topics, short), start, last, follow, stop):
        yield as_json(rec, value, topics.raw) if json_lines else as_line(rec, value)


def records(topic: Topic, start: dict, last: int, follow: bool, stop: threading.Event) -> Iterator:
    """(record, decoded value or DecodeError) from start ({} for the last `last` of each partition, else
    from_offset or from_time_ms) to the end as of now, and with follow until stop."""
    consumer = topic.consumer()
    try:
        parts = topic.partitions_in(consumer)
        if not parts:
            raise TbaError(f"{topic.name} does not exist: were the job's topics created (`tba topics create`)?")
        consumer.assign(parts)
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        if start:
            if "from_offset" in start:
                first = {tp: min(max(begin[tp], start["from_offset"]), end[tp]) for tp in parts}
            else:
                found = consumer.offsets_for_times(dict.fromkeys(parts, start["from_time_ms"]))
                first = {tp: found[tp].offset if found.get(tp) else end[tp] for tp in parts}
            for batch in topic.read_range(consumer, first, end):
                yield from topic.decoded(r for part in batch.values() for r in part)
                if stop.is_set():
                    return
        else:
            yield from topic.decoded(last_records(topic, consumer, begin, end, last))
        for tp in parts:  # follow from where the records shown end, whatever the reads above fetched meanwhile
            consumer.seek(tp, end[tp])
        while follow and not stop.is_set():
            batch = consumer.poll(timeout_ms=500)
            yield from topic.decoded(r for part in batch.values() for r in part)
    finally:
        consumer.close()


def last_records(topic: Topic, consumer, begin: dict, end: dict, last: int) -> list:
    """Each partition's last `last` records: a transactional topic's commit markers (and aborted records) take
    offsets too, so the window read widens until it holds that many or reaches the beginning."""
    found = []
    for tp in end:
        window = last
        while True:
            start = max(begin[tp], end[tp] - window)
            held = [r for batch in topic.read_range(consumer, {tp: start}, {tp: end[tp]})
                    for part in batch.values() for r in part]  # fmt: skip
            if len(held) >= last or start == begin[tp]:
                found += held[-last:]
                break
            window *= 4
    return found


def as_json(rec, value, raw: Topic) -> str:
    """The record as one JSON object: where it is, and its value as the topic's schema has it (numbers for
    token ids and log-probs; a dead letter's rejected record decoded when it can be)."""
    out = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "timestamp_ms": rec.timestamp,
           "key": rec.key.decode("utf-8", "replace") if rec.key is not None else None}  # fmt: skip
    if isinstance(value, DecodeError):
        out["undecodable"] = str(value)
    elif isinstance(value, DeadLetter):
        letter = dataclasses.asdict(value)
        letter["key"] = value.key.decode("utf-8", "replace") if value.key is not None else None
        try:
            letter["value"] = dataclasses.asdict(raw.codec.decode(value.value))
        except DecodeError as exc:  # a record no codec of ours reads: its bytes, as they were
            letter["value"] = {"undecodable": str(exc), "base64": base64.b64encode(value.value).decode()}
        out["value"] = letter
    else:
        out["value"] = dataclasses.asdict(value) if isinstance(value, TrajectoryGroup) else value
    return json.dumps(out, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))


def as_line(rec, value) -> str:
    """The record in one line: where it is and what a reader looks for first."""
    when = datetime.fromtimestamp(rec.timestamp / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = f"{rec.partition}:{rec.offset} {when}"
    if isinstance(value, DecodeError):
        return f"{head} undecodable: {value}"
    if isinstance(value, TrajectoryGroup):
        rewards = value.rewards
        spread = f"mean {rewards.mean():.3f} [{rewards.min():.3f}, {rewards.max():.3f}]" if rewards.size else "none"
        return (f"{head} group {value.group_id} prompt {value.prompt_id} v{value.policy_version} "
                f"{len(value.samples)} samples, rewards {spread}, from {value.generator_id or '?'}")  # fmt: skip
    if isinstance(value, DeadLetter):
        return (f"{head} rejected {value.source_topic}:{value.source_partition}:{value.source_offset} "
                f"by {value.scorer}: {value.reason}")  # fmt: skip
    if "version" in value:
        return f"{head} policy version {value['version']} (step {value['step']}, sha256 {value['sha256'][:12]})"
    return f"{head} prompt {value['prompt_id']}: {value['question'][:80]!r}"
