"""ReplayBuffer: offset index, TBA sampling, read-back of evicted groups, replays by offset and time."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from ops.config import BufferConfig, with_overrides
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import synthetic_group
from schemas.codec import SchemaStore
from schemas.records import TrajectoryCodec
from trainer.curated_feed import CuratedFeed, curated_buffer
from trainer.replay_buffer import ReplayBuffer


class MemoryReader:
    """The reader a ReplayBuffer reads evicted groups back with, over a dict: the sampler's tests need no broker."""

    topic = "memory"
    spill = None

    def __init__(self):
        self.values: dict[tuple[int, int], bytes] = {}
        self.reads: list[list[tuple[int, int]]] = []

    def keep(self, records) -> None:
        self.values.update(((p, o), v) for p, o, v in records)

    def read(self, wanted):
        self.reads.append(list(wanted))
        found = {key: self.values[key] for key in wanted if key in self.values}
        return found, [key for key in wanted if key not in found]

    def close(self) -> None:
        pass


def in_memory(seed: int = 0, **settings) -> ReplayBuffer:
    codec = TrajectoryCodec(SchemaStore())
    return ReplayBuffer(BufferConfig(**settings), codec, MemoryReader(), seed=seed)


def on_curated(cfg, store, **kwargs) -> ReplayBuffer:
    return curated_buffer(cfg, JobTopics(cfg, store).curated, **kwargs)


def publish_curated(cfg, store, groups):
    with TrajectoryProducer(cfg, topic=JobTopics(cfg, store).curated) as producer:
        for g in groups:
            producer.send(g)


def filled(cfg, store, **fill):
    buffer = on_curated(cfg, store)
    feed = CuratedFeed(cfg, buffer)
    feed.fill(**fill)
    feed.close()
    return buffer


def group_ids(buffer):
    return sorted(buffer.group(i).group_id for i in range(len(buffer)))


def test_replay_from_a_timestamp_and_from_offsets_returns_exactly_that_range(cfg, store, rng):
    early = [synthetic_group(rng, i % 7) for i in range(60)]
    publish_curated(cfg, store, early)
    time.sleep(0.05)
    middle = int(time.time() * 1000)
    time.sleep(0.05)
    late = [synthetic_group(rng, i % 7) for i in range(40)]
    publish_curated(cfg, store, late)

    assert group_ids(filled(cfg, store, from_time_ms=middle)) == sorted(g.group_id for g in late)
    assert group_ids(filled(cfg, store, to_time_ms=middle)) == sorted(g.group_id for g in early)

    records = read_topic(cfg, topic_names(cfg).curated)
    codec = TrajectoryCodec(store)
    expected = sorted(codec.decode(r.value).group_id for r in records if 5 <= r.offset < 20)
    assert group_ids(filled(cfg, store, from_offset=5, to_offset=20)) == expected


def test_a_live_feed_after_a_replayed_range_reads_what_arrives_next_and_nothing_else(cfg, store, rng):
    publish_curated(cfg, store, [synthetic_group(rng, i % 7) for i in range(40)])
    codec = TrajectoryCodec(store)
    in_range = sorted(codec.decode(r.value).group_id for r in read_topic(cfg, topic_names(cfg).curated) if r.offset < 3)
    buffer = on_curated(cfg, store)
    feed = CuratedFeed(cfg, buffer)
    feed.fill(to_offset=3)  # `tba replay --to 3 --live`
    fresh = [synthetic_group(rng, i % 7) for i in range(6)]
    publish_curated(cfg, store, fresh)
    deadline = time.monotonic() + 30
    while len(buffer) < len(in_range) + len(fresh) and time.monotonic() < deadline:
        feed.poll(200)
    feed.poll(500)  # and nothing more: history after the range stays out
    feed.close()
    assert group_ids(buffer) == sorted(in_range + [g.group_id for g in fresh])


def test_on_policy_fraction_is_m(rng):
    buffer = in_memory(seed=7, on_policy_prob=0.7, samples_per_prompt=4)
    for i in range(300):
        version = 5 if i >= 280 else i % 5  # only 20 groups come from the newest policy
        buffer.add(0, i, synthetic_group(rng, i, samples=4, policy_version=version))
    draws = [sp for _ in range(3000) for sp in buffer.sample(1)]
    on_policy = np.mean([sp.on_policy for sp in draws])
    assert abs(on_policy - 0.7) < 0.03
    assert all(v == 5 for sp in draws if sp.on_policy for v in sp.policy_versions)
    # the uniform branch picks the newest prompts only in proportion to their share (20/300)
    newest_in_uniform = np.mean([sp.policy_versions[0] == 5 for sp in draws if not sp.on_policy])
    assert newest_in_uniform < 0.15


def test_per_prompt_cap_keeps_the_newest_samples_and_duplicates_are_removed(rng):
    buffer = in_memory(per_prompt_cap=20, on_policy_prob=0.0, samples_per_prompt=20)
    for v in range(10):  # ten groups of 8 for one prompt: the newest 20 samples span versions 7-9
        buffer.add(0, v, synthetic_group(rng, 1, samples=8, policy_version=v))
    (sp,) = buffer.sample(1)
    assert set(sp.policy_versions) <= {7, 8, 9} and 9 in sp.policy_versions
    assert len({s.digest() for s in sp.samples}) == 20  # 20 distinct from a pool of exactly 20

    dup = synthetic_group(rng, 2, samples=6)
    dup.samples = [dup.samples[0]] * 3 + dup.samples[3:]  # three copies of one completion
    buffer.add(0, 10, dup)
    for _ in range(10):  # both prompts, 4 samples each: the duplicated prompt's pool is exactly 4 distinct
        (picked,) = [sp for sp in buffer.sample(2, k=4) if sp.prompt_id == "arith-2"]
        assert len({s.digest() for s in picked.samples}) == 4


def test_reward_temperature_prioritises_high_reward(rng):
    buffer = in_memory(reward_inv_temp=50.0, on_policy_prob=0.0, samples_per_prompt=4)
    g = synthetic_group(rng, 3, samples=12)
    for j, s in enumerate(g.samples):
        s.reward = 1.0 if j < 4 else 0.0
    buffer.add(0, 0, g)
    rewards = [s.reward for _ in range(50) for s in buffer.sample(1)[0].samples]
    assert np.mean(rewards) == 1.0


@pytest.mark.parametrize("spill_gb", [0, 1], ids=["from-kafka", "from-the-spill-file"])
def test_evicted_groups_are_read_back_by_offset(cfg, store, rng, spill_gb):
    groups = [synthetic_group(rng, i, samples=3) for i in range(50)]
    publish_curated(cfg, store, groups)
    cfg = with_overrides(cfg, buffer={"cache_groups": 5, "spill_gb": spill_gb})
    buffer = filled(cfg, store)
    assert len(buffer) == 50 and len(buffer._cache) == 5
    by_id = {g.group_id: g for g in groups}
    for i in range(len(buffer)):
        back = buffer.group(i)
        original = by_id[back.group_id]
        assert np.array_equal(back.samples[2].logprobs, original.samples[2].logprobs)
    assert buffer.index_nbytes() > 0
    assert (buffer._reader._consumer is None) == bool(spill_gb)  # the spill file served every read
    buffer.close()


def test_replay_of_a_missing_topic_is_a_clear_error(cfg, store):
    from ops.errors import TbaError

    other = with_overrides(cfg, kafka={"namespace": cfg.kafka.namespace + "-absent"})
    with pytest.raises(TbaError, match="does not exist; run `tba topics create`"):
        CuratedFeed(other, on_curated(other, store))


def same_batches(a, b) -> bool:
    return (
        [x.prompt_id for x in a] == [x.prompt_id for x in b]
        and [x.policy_versions for x in a] == [x.policy_versions for x in b]
        and all(
            np.array_equal(s.token_ids, t.token_ids)
            for x, y in zip(a, b, strict=True)
            for s, t in zip(x.samples, y.samples, strict=True)
        )
    )


def test_a_step_reads_its_evicted_groups_back_together_and_samples_as_if_all_were_cached(cfg, store, rng):
    groups = [synthetic_group(rng, i % 30, samples=4) for i in range(120)]  # 30 prompts, 4 groups each
    publish_curated(cfg, store, groups)
    cached = filled(with_overrides(cfg, buffer={"cache_groups": 1000}), store)
    # every group read back, from Kafka
    evicting = filled(with_overrides(cfg, buffer={"cache_groups": 0, "spill_gb": 0}), store)
    wanted, read = [], evicting._reader.read
    evicting._reader.read = lambda rows: wanted.append(len(rows)) or read(rows)
    for _ in range(3):  # same seed, same draws: the same distribution
        assert same_batches(cached.sample(16, 4), evicting.sample(16, 4))
    assert len(wanted) == 3  # one read-back per step, for all its prompts
    cached.close()
    evicting.close()


def test_a_prefetched_batch_is_the_one_sample_draws_and_is_read_on_another_thread(cfg, store, rng):
    import threading

    groups = [synthetic_group(rng, i % 30, samples=4) for i in range(120)]
    publish_curated(cfg, store, groups)
    plain = filled(with_overrides(cfg, buffer={"cache_groups": 0}), store)
    ahead = filled(with_overrides(cfg, buffer={"cache_groups": 0}), store)
    readers, read = [], ahead._reader.read
    ahead._reader.read = lambda rows: readers.append(threading.current_thread().name) or read(rows)
    pending = ahead.prefetch(16, 4)
    for _ in range(3):
        batch = pending.result()
        pending = ahead.prefetch(16, 4)  # the next step's, read while this one would train
        assert same_batches(plain.sample(16, 4), batch)
    assert same_batches(plain.sample(16, 4), pending.result())  # the fourth, read by now
    assert len(readers) == 4 and all(name.startswith("prefetch") for name in readers)
    plain.close()
    ahead.close()


def test_groups_that_retention_removed_are_dropped_with_a_warning_and_sampling_goes_on(cfg, store, rng, caplog):
    from kafka import TopicPartition

    from ops import kafka_clients

    groups = [synthetic_group(rng, i % 12, samples=4) for i in range(72)]  # 12 prompts, 6 groups each
    publish_curated(cfg, store, groups)
    # every draw reads Kafka
    buffer = filled(with_overrides(cfg, buffer={"cache_groups": 0, "spill_gb": 0}), store)
    topic = topic_names(cfg).curated
    ends = dict(buffer.next_offsets)
    admin = kafka_clients.admin(cfg)
    try:
        admin.delete_records({TopicPartition(topic, p): end // 2 for p, end in ends.items()})  # "retention"
        for _ in range(4):
            batch = buffer.sample(6, 4)
            assert len(batch) == 6 and all(len(x.samples) == 4 for x in batch)
        rows = sorted(buffer.unreadable)
        assert rows and all(buffer.offset.values[i] < ends[int(buffer.partition.values[i])] // 2 for i in rows)
        assert "could not be read back" in caplog.text and "training goes on" in caplog.text

        emptied = max(ends, key=ends.get)  # a whole partition removed: nothing comes back from it at all
        admin.delete_records({TopicPartition(topic, emptied): ends[emptied]})
        for _ in range(4):
            batch = buffer.sample(12, 4)  # its prompts are no longer drawn; the others still are
            assert batch and all(len(x.samples) == 4 for x in batch)
        assert {int(buffer.partition.values[i]) for i in buffer.unreadable} >= {emptied}
    finally:
        admin.close()
        buffer.close()


def test_the_spill_file_serves_what_retention_removed_and_what_kafka_served_once(cfg, store, rng):
    from kafka import TopicPartition

    from ops import kafka_clients

    groups = [synthetic_group(rng, i % 12, samples=4) for i in range(72)]
    publish_curated(cfg, store, groups)
    kept = filled(with_overrides(cfg, buffer={"cache_groups": 0}), store)  # kept in the spill as read
    indexed = on_curated(with_overrides(cfg, buffer={"cache_groups": 0}), store)  # indexed, nothing kept
    for i in range(len(kept)):
        indexed.add(int(kept.partition.values[i]), int(kept.offset.values[i]), kept.group(i))
    indexed.fetch(range(len(indexed)))  # read back from Kafka once, kept from then on
    assert indexed._reader._consumer is not None
    ends = dict(kept.next_offsets)
    admin = kafka_clients.admin(cfg)
    try:
        admin.delete_records({TopicPartition(topic_names(cfg).curated, p): end for p, end in ends.items()})
        for buffer in (kept, indexed):
            for _ in range(3):
                batch = buffer.sample(12, 4)
                assert len(batch) == 12 and all(len(x.samples) == 4 for x in batch)
            assert not buffer.unreadable
        assert kept._reader._consumer is None  # Kafka never asked
    finally:
        admin.close()
        kept.close()
        indexed.close()


def test_a_long_fill_says_how_far_it_got_and_stops_when_told(cfg, store, rng, caplog, monkeypatch):
    import logging
    import threading

    import trainer.curated_feed

    monkeypatch.setattr(trainer.curated_feed, "PROGRESS_S", 0.0)  # a line every poll
    publish_curated(cfg, store, [synthetic_group(rng, i % 10, samples=2, tokens=8) for i in range(2000)])
    buffer = on_curated(cfg, store)
    feed = CuratedFeed(cfg, buffer)
    stop, ingest = threading.Event(), buffer.ingest
    buffer.ingest = lambda records: (stop.set(), ingest(records))[1]  # Ctrl-C during the first poll's records
    with caplog.at_level(logging.INFO, logger="trainer.curated_feed"):
        added = feed.fill(stop_event=stop)
    assert 0 < added <= 500 and len(buffer) == added  # stopped after one poll (<= 500), with what it read
    assert "records read" in caplog.text and "a second" in caplog.text and "left (Ctrl-C stops)" in caplog.text
    feed.close()
    buffer.close()


def test_the_index_drops_the_groups_no_draw_reaches_and_draws_as_before(rng):
    """A long job's index stays bounded: a prompt's groups beyond 2 x per_prompt_cap samples are dropped once
    they are most of it, and the draws (same random state) pick the same records before and after."""
    buffer, ids = in_memory(per_prompt_cap=16, samples_per_prompt=4, on_policy_prob=0.5), {}
    for offset in range(300):  # 3 prompts, 100 groups of 4 samples each, a new policy version every 30 groups
        group = synthetic_group(rng, offset % 3, samples=4, policy_version=offset // 30)
        buffer.add(0, offset, group)
        ids[offset] = group.group_id

    def draws():
        picks = [d.picked for _ in range(20) for d in buffer.draw(3, 4)]
        return [[(int(buffer.offset.values[g]), j) for g, j in picked] for picked in picks]

    state = buffer.rng.bit_generator.state
    before = draws()
    buffer.rng.bit_generator.state = state
    buffer.compact_at = 0  # due now: 300 rows are far below the default
    assert buffer.compact() == 300 - 3 * 8  # each prompt keeps its newest 8 groups: 32 samples
    assert len(buffer) == 24 and sorted(buffer.offset.values.tolist()) == list(range(276, 300))
    assert draws() == before
    # the decoded groups cached under the old row numbers are found under the new ones
    assert [buffer.group(i).group_id for i in range(len(buffer))] == [ids[o] for o in buffer.offset.values.tolist()]
    assert all(sp.prompt_id.startswith("arith-") and len(sp.samples) == 4 for sp in buffer.sample(3))

    buffer.compact_at = 40  # sample() compacts on its own once the index reaches compact_at
    for offset in range(300, 330):
        buffer.add(0, offset, synthetic_group(rng, offset % 3, samples=4, policy_version=10))
    buffer.sample(3)
    assert len(buffer) == 24 and buffer.compact_at == 100_000


def records(codec, groups, partition: int = 0):
    """Curated ConsumerRecords of the groups, at offsets 0, 1, ..."""
    return [SimpleNamespace(partition=partition, offset=i, key=g.prompt_id.encode(), value=codec.encode(g))
            for i, g in enumerate(groups)]  # fmt: skip


def test_evicted_groups_come_back_from_the_reader_and_those_gone_leave_the_index(rng):
    buffer = in_memory(cache_groups=2, on_policy_prob=0.0, samples_per_prompt=4)
    groups = [synthetic_group(rng, i % 5, samples=4) for i in range(20)]  # 5 prompts, 4 groups each
    assert buffer.ingest(records(buffer.codec, groups)) == 20
    reader = buffer._reader
    assert len(reader.values) == 20  # every record ingested is kept to be read back
    gone = {(0, o) for o in range(0, 20, 5)}  # each of prompt 0's groups: none of its samples can be read
    for key in gone:
        del reader.values[key]
    for _ in range(5):
        batch = buffer.sample(5, 4)
        assert len(batch) == 4 and all(len(x.samples) == 4 for x in batch)
        assert "arith-0" not in {x.prompt_id for x in batch}
    assert {(0, int(buffer.offset.values[i])) for i in buffer.unreadable} == gone
    assert len(reader.reads[0]) > 2  # a step's groups are read back at once


def test_records_that_do_not_decode_or_are_not_admitted_are_rejected_and_passed_over(rng):
    rejected = []
    buffer = ReplayBuffer(BufferConfig(), TrajectoryCodec(SchemaStore()), MemoryReader(),
                          admit=lambda g: "too long" if g.prompt_id == "arith-1" else None,
                          reject=lambda record, reason: rejected.append((record.offset, reason)))  # fmt: skip
    batch = records(buffer.codec, [synthetic_group(rng, i) for i in range(3)])
    batch[2].value = b"not avro"
    assert buffer.ingest(batch) == 1 and len(buffer) == 1
    assert rejected[0] == (1, "too long") and rejected[1][0] == 2 and rejected[1][1].startswith("undecodable")
    assert buffer.next_offsets == {0: 3} and buffer.rejected == 2
