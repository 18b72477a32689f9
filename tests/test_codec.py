"""The one codec: single-object encoding, the topic-backed schema store, Avro resolution both ways."""

import copy

import numpy as np
import pytest
from fastavro import parse_schema
from fastavro.schema import to_parsing_canonical_form

from ops.errors import DecodeError
from ops.topics import KafkaSchemaStore
from producers.synthetic import synthetic_group
from schemas.codec import MAGIC, Codec, SchemaStore, load_schema, schema_fingerprint
from schemas.records import TrajectoryCodec


def v2_schema() -> dict:
    """TrajectoryGroup with one more field, defaulted: what a newer searcher might write."""
    schema = copy.deepcopy(load_schema("trajectory_group"))
    schema["fields"].append({"name": "temperature", "type": "double", "default": 1.0})
    return schema


def test_round_trip_is_exact(rng):
    codec = TrajectoryCodec(SchemaStore())
    group = synthetic_group(rng, 3, samples=5, tokens=40, policy_version=7)
    data = codec.encode(group)
    back = codec.decode(data)
    assert data[:2] == MAGIC and data[2:10] == schema_fingerprint(load_schema("trajectory_group"))
    assert back.group_id == group.group_id and back.policy_version == 7 and back.created_at == group.created_at
    for a, b in zip(group.samples, back.samples, strict=True):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)
        assert np.array_equal(a.ref_logprobs, b.ref_logprobs) and a.reward == b.reward


def test_packed_fields_are_little_endian(rng):
    group = synthetic_group(rng, 0, samples=1, tokens=4)
    rec = group.to_record()
    ids = group.samples[0].token_ids
    assert rec["samples"][0]["token_ids"] == b"".join(int(t).to_bytes(4, "little") for t in ids)


def test_v2_writer_read_by_v1_reader_through_the_schema_topic(cfg, rng):
    writer = Codec(v2_schema(), KafkaSchemaStore(cfg))
    record = synthetic_group(rng, 1).to_record() | {"temperature": 0.7}
    data = writer.encode(record)
    # a fresh store, as in another process that has never seen v2: it must find it in the topic
    reader = TrajectoryCodec(KafkaSchemaStore(cfg))
    group = reader.decode(data)
    assert group.group_id == record["group_id"]
    assert "temperature" not in group.to_record()


def test_a_mislabelled_schema_in_the_store_is_ignored(rng):
    """Every writer may write the schemas topic (ops/acls.py): an entry counts only under its own fingerprint."""
    data = Codec(v2_schema(), SchemaStore()).encode(synthetic_group(rng, 1).to_record() | {"temperature": 0.7})
    fp = schema_fingerprint(v2_schema())
    other = {"type": "record", "name": "Other", "fields": [{"name": "n", "type": "int"}]}

    class Shared(SchemaStore):  # the topic as another process finds it: a forged entry first, then the real one
        def fetch(self):
            return [(fp, to_parsing_canonical_form(parse_schema(other))),
                    (fp, to_parsing_canonical_form(parse_schema(v2_schema())))]  # fmt: skip

    assert TrajectoryCodec(Shared()).decode(data).group_id


def test_v1_writer_read_by_v2_reader_gets_the_default(cfg, rng):
    data = TrajectoryCodec(KafkaSchemaStore(cfg)).encode(synthetic_group(rng, 1))
    rec = Codec(v2_schema(), KafkaSchemaStore(cfg)).decode(data)
    assert rec["temperature"] == 1.0


def test_bad_bytes_raise_decode_error_with_a_reason(cfg, rng):
    store = KafkaSchemaStore(cfg)
    codec = TrajectoryCodec(store)
    good = codec.encode(synthetic_group(rng, 2))
    foreign_schema = {"type": "record", "name": "Other", "namespace": "x", "fields": [{"name": "n", "type": "int"}]}
    foreign = Codec(foreign_schema, store).encode({"n": 5})
    marked = synthetic_group(rng, 2)
    marked.prompt = "QQQQ"
    marked_bytes = codec.encode(marked)
    cases = {
        "invalid UTF-8": marked_bytes.replace(b"QQQQ", b"\xff\xfe\xfd\xfc"),
        "too short": b"\xc3",
        "neither Avro single-object encoding nor Confluent's framing": b"hello world, plain text",
        r"Confluent-framed record \(schema id 7\) and no schema registry": b"\x00\x00\x00\x00\x07" + good[10:],
        "unknown writer schema": MAGIC + b"\x01" * 8 + good[10:],
        "corrupt Avro body": good[: len(good) // 2],
        "trailing bytes": good + b"\x00\x00",
        r"\(x.Other\) cannot be read as tba.TrajectoryGroup": foreign,
    }
    for expected, data in cases.items():
        with pytest.raises(DecodeError, match=expected):
            codec.decode(data)


def test_a_namespace_without_topics_is_a_clear_error_not_a_timeout_trace(cfg):
    from ops.config import with_overrides
    from ops.errors import TbaError

    absent = with_overrides(cfg, kafka={"namespace": cfg.kafka.namespace + "-absent", "client_timeout_s": 2})
    with pytest.raises(TbaError, match=r"-absent\.schemas within 2s: were the namespace's topics created"):
        TrajectoryCodec(KafkaSchemaStore(absent))


def test_a_prompt_is_avro_on_the_prompts_topic_and_comes_back_as_the_same_problem():
    from ops.topics import JobTopics
    from policy.tasks import Problem
    from policy.tasks.prompts import problem_from_record, problem_record
    from tests.conftest import make_config

    prompts = JobTopics(make_config("127.0.0.1:1"), SchemaStore()).prompts
    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"})
    problem = Problem("q-17", "What is 2 + 3?", "5", chat)
    value = prompts.codec.encode(problem_record(problem))
    assert value[:2] == MAGIC and value[2:10] == schema_fingerprint(load_schema("prompt"))
    assert problem_from_record(prompts.codec.decode(value)) == problem
