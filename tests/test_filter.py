"""raw -> filter group -> curated | dlq -> ReplayBuffer, on the real broker, exactly once."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from consumers.filter import FilterConsumer
from ops import kafka_clients
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import BAD_KINDS, synthetic_group
from schemas.codec import Codec, SchemaStore
from schemas.records import DeadLetterCodec, TrajectoryCodec
from tests.conftest import make_config
from tests.test_run import wait_until
from trainer.curated_feed import CuratedFeed, curated_buffer


def run_filters(cfg, store, instances=1, idle_exit_s=3.0, then=None):
    """Filter instances in threads until raw goes idle; then() runs once each instance owns partitions."""
    workers = [FilterConsumer(cfg, instance=str(i), store=store) for i in range(instances)]
    threads = [threading.Thread(target=w.run, kwargs={"idle_exit_s": idle_exit_s}) for w in workers]
    for t in threads:
        t.start()
    if then is not None:
        wait_until(lambda: all(w.consumer.assignment() for w in workers), 60, "every filter instance to join")
        then()
    for t in threads:
        t.join(timeout=120)
    for w in workers:
        w.close()
    return workers


def test_round_trip_with_malformed_records_interleaved(cfg, store, rng):
    names = topic_names(cfg)
    valid, bad = [], {}
    foreign = Codec({"type": "record", "name": "Other", "fields": [{"name": "n", "type": "int"}]}, store)

    def produce():
        raw = kafka_clients.producer(cfg)
        with TrajectoryProducer(cfg, store) as producer:
            for i in range(300):
                group = synthetic_group(rng, i % 40, policy_version=i // 100)
                if i % 50 == 7:  # the three malformed-group kinds, in turn
                    kind = list(BAD_KINDS)[(i // 50) % 3]
                    group = BAD_KINDS[kind](group)
                    bad[group.group_id] = kind
                else:
                    valid.append(group.group_id)
                producer.send(group)
                if i == 100:
                    raw.send(names.raw, key=b"junk", value=rng.bytes(300))
                if i == 200:
                    raw.send(names.raw, key=b"foreign", value=foreign.encode({"n": 1}))
        raw.flush()
        raw.close()

    # produced once both instances have joined, so that each owns a partition of what arrives
    workers = run_filters(cfg, store, instances=2, idle_exit_s=10, then=produce)
    assert sum(w.stats.consumed for w in workers) == 302
    assert all(w.stats.consumed > 0 for w in workers)  # the two instances shared the partitions

    codec = TrajectoryCodec(store)
    curated = [codec.decode(r.value) for r in read_topic(cfg, names.curated)]
    assert sorted(g.group_id for g in curated) == sorted(valid)  # all valid, each exactly once
    assert all(set(g.scores) == set(cfg.filter.scorers) for g in curated)

    letters = [DeadLetterCodec(store).decode(r.value) for r in read_topic(cfg, names.dlq)]
    by_scorer = Counter(letter.scorer for letter in letters)
    assert by_scorer == Counter({**Counter(bad.values()), "decode": 2})
    for letter in letters:
        if letter.scorer == "decode":
            assert letter.key in (b"junk", b"foreign")
            expected = "neither Avro single" if letter.key == b"junk" else "cannot be read as tba.TrajectoryGroup"
            assert expected in letter.reason
        else:
            original = codec.decode(letter.value)  # the original bytes, untouched
            assert bad[original.group_id] == letter.scorer and letter.reason
        assert letter.source_topic == names.raw and letter.source_offset >= 0

    buffer = curated_buffer(cfg, JobTopics(cfg, store).curated)
    feed = CuratedFeed(cfg, buffer)
    assert feed.fill() == len(valid)
    assert feed.fill() == 0  # offsets already ingested are not admitted twice
    assert len(buffer) == len(valid) and buffer.newest_version == 2
    feed.close()


def test_a_filter_killed_mid_stream_loses_nothing_and_duplicates_nothing(cfg, store, rng):
    names = topic_names(cfg)
    with TrajectoryProducer(cfg, store) as producer:
        ids = [producer.send(g) and g.group_id for g in (synthetic_group(rng, i % 60) for i in range(3000))]
    env = {
        **os.environ,
        "TBA__KAFKA__BOOTSTRAP": cfg.kafka.bootstrap,
        "TBA__KAFKA__NAMESPACE": cfg.kafka.namespace,
        "TBA__FILTER__MAX_POLL_RECORDS": "50",  # many small transactions, so the kill lands inside one
    }
    cmd = [sys.executable, "-m", "tba.cli", "filter", "--instance", "0"]
    first = subprocess.Popen(cmd + ["--idle-exit", "30"], env=env)
    consumer = kafka_clients.consumer(cfg)
    curated_parts = [tp for tp in _partitions(consumer, names.curated)]
    deadline = time.monotonic() + 60
    while sum(consumer.end_offsets(curated_parts).values()) < 600 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    consumer.close()
    done_before_kill = len(read_topic(cfg, names.curated))
    assert 0 < done_before_kill < 3000

    second = subprocess.run(cmd + ["--idle-exit", "4"], env=env, timeout=180, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    codec = TrajectoryCodec(store)
    curated = Counter(codec.decode(r.value).group_id for r in read_topic(cfg, names.curated))
    assert set(curated) == set(ids), second.stdout  # nothing lost
    assert max(curated.values()) == 1  # nothing twice
    assert not read_topic(cfg, names.dlq)


def _partitions(consumer, topic):
    from kafka import TopicPartition

    return [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]


def test_dead_letters_are_redriven_once_and_rescored(cfg, store, rng, monkeypatch):
    from click.testing import CliRunner

    from ops.config import with_overrides
    from tba.cli import cli

    strict = with_overrides(cfg, filter={"max_completion_tokens": 40})
    with TrajectoryProducer(strict, store) as producer:
        long_ids = [producer.send(g) and g.group_id for g in (synthetic_group(rng, i, tokens=64) for i in range(4))]
    run_filters(strict, store)
    assert not read_topic(cfg, topic_names(cfg).curated)  # every group was too long for the strict filter
    stranger = kafka_clients.producer(cfg)  # anyone may write the dlq: bytes that are no letter are passed over
    stranger.send(topic_names(cfg).dlq, value=b"not a dead letter").get(timeout=30)
    stranger.close()
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    runner = CliRunner()
    assert "re-drove 0 dead letter(s)" in runner.invoke(cli, ["filter", "--redrive", "--scorer", "safety"]).output
    out = runner.invoke(cli, ["filter", "--redrive", "--scorer", "length_limits"])
    assert "re-drove 4 dead letter(s)" in out.output, out.output
    assert "re-drove 0 dead letter(s)" in runner.invoke(cli, ["filter", "--redrive"]).output  # once each
    typo = runner.invoke(cli, ["filter", "--redrive", "--scorer", "length_limit"])
    assert typo.exit_code == 2, typo.output
    assert "'length_limit' is none of decode, model, completion, structure" in typo.output
    run_filters(cfg, store)  # the relaxed default limits accept them now
    codec = TrajectoryCodec(store)
    assert sorted(codec.decode(r.value).group_id for r in read_topic(cfg, topic_names(cfg).curated)) == sorted(long_ids)


def in_memory_filter(**sections):
    """A GroupFilter over topics whose codecs share an in-memory store: routing needs no broker."""
    from consumers.filter import GroupFilter

    cfg = make_config("127.0.0.1:1", **sections)
    topics = JobTopics(cfg, SchemaStore())
    return GroupFilter(cfg, topics), topics


def test_a_group_made_with_another_model_goes_to_the_dlq_as_model(rng):
    groups_filter, topics = in_memory_filter(searcher={"model": "/models/my-policy"})
    route, codec = groups_filter.route, topics.raw.codec
    ours, unnamed, theirs = (synthetic_group(rng, i) for i in range(3))
    ours.model_id, theirs.model_id = "my-policy", "other-policy"
    assert route(codec.encode(ours)).accepted and route(codec.encode(unnamed)).accepted
    rejected = route(codec.encode(theirs))
    letter = topics.dlq.codec.decode(rejected.value)
    assert not rejected.accepted and rejected.scorer == "model"
    assert letter.reason == "made with model 'other-policy'; this job trains 'my-policy' (another tokenizer)"


def test_routing_sends_what_a_scorer_or_the_codec_rejects_to_the_dlq_with_the_original_bytes(rng):
    groups_filter, topics = in_memory_filter()
    codec, letters = topics.raw.codec, topics.dlq.codec
    good = synthetic_group(rng, 0)
    routed = groups_filter.route(codec.encode(good), b"arith-0", 2, 17)
    assert routed.accepted and set(codec.decode(routed.value).scores) >= {"structure", "finite_rewards"}
    for kind, bad in BAD_KINDS.items():
        value = codec.encode(bad(synthetic_group(rng, 1)))
        routed = groups_filter.route(value, b"arith-1", 2, 18)
        letter = letters.decode(routed.value)
        assert not routed.accepted and routed.scorer == kind == letter.scorer and letter.value == value
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (topics.raw.name, 2, 18)
    junk = groups_filter.route(b"junk", None, 0, 3)
    assert not junk.accepted and junk.scorer == "decode" and letters.decode(junk.value).value == b"junk"
