"""Generators that are not ours feed a job: a writer using Apache's own `avro` library (no project code on
the writing side), and text-only groups (no token ids, no log-probs) that the filter completes with the
job's tokenizer and reference model before they reach curated and train."""

import io
import json
import threading
from datetime import UTC, datetime

import avro.io
import avro.schema
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from consumers.filter import GroupFilter
from ops import kafka_clients
from ops.broker import free_port
from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from policy.completion import GroupCompleter
from policy.generation import HFGenerator
from policy.models import chat_prompt_ids
from schemas.codec import SchemaStore, load_schema
from schemas.records import DeadLetterCodec, Sample, TrajectoryCodec, TrajectoryGroup
from tba.cli import cli
from tba.live_view import scrape
from tests.conftest import trainer_on_tiny_model
from tests.test_filter import run_filters
from tests.test_run import wait_until
from tests.tiny_models import char_tokenizer, saved_tiny_llama, tiny_llama
from trainer.job import run_trainer


def apache_avro_message(schema_json: dict, record: dict) -> tuple[bytes, str, bytes]:
    """(fingerprint, canonical form, message) as a writer with Apache's library makes them."""
    schema = avro.schema.parse(json.dumps(schema_json))
    fp = schema.fingerprint("CRC-64-AVRO")
    body = io.BytesIO()
    avro.io.DatumWriter(schema).write(record, avro.io.BinaryEncoder(body))
    return fp, schema.canonical_form, b"\xc3\x01" + fp + body.getvalue()


def apache_record(prompt_id: str, rewards: list[float], **extra) -> dict:
    ids = np.arange(5, 9, dtype="<i4").tobytes()
    lps = np.full(4, -0.5, "<f4").tobytes()
    return {
        "group_id": f"apache-{prompt_id}", "prompt_id": prompt_id, "task": "outside", "prompt": "2 + 2?",
        "messages": [], "prompt_token_ids": np.arange(3, 7, dtype="<i4").tobytes(),
        "samples": [{"completion": f"answer {i}", "token_ids": ids, "logprobs": lps, "ref_logprobs": lps,
                     "reward": r, "finish_reason": "stop"} for i, r in enumerate(rewards)],
        "policy_version": -1, "generator_id": "apache-avro", "model_id": "",
        "created_at": datetime.fromtimestamp(1_700_000_000, UTC),  # Apache's takes the logical type's value
        "scores": {}, "metadata": {"by": "apache"}, **extra,
    }  # fmt: skip


MINIMAL = {  # ours with every defaulted field left out: the text-only form
    "type": "record", "name": "TrajectoryGroup", "namespace": "tba", "fields": [
        {"name": "prompt_id", "type": "string"},
        {"name": "prompt", "type": "string"},
        {"name": "samples", "type": {"type": "array", "items": {"type": "record", "name": "Sample", "fields": [
            {"name": "completion", "type": "string"}, {"name": "reward", "type": "double"}]}}},
    ],
}  # fmt: skip


def test_a_writer_using_apaches_avro_library_reaches_curated(cfg, store, tmp_path):
    """The registration is trusted by its key: the CRC-64-AVRO of the canonical text as registered, though
    Apache's canonical form differs from fastavro's (logical types); a mislabelled one is still refused."""
    cfg = with_overrides(cfg, searcher={"model": saved_tiny_llama(tmp_path / "model")})
    ours = load_schema("trajectory_group")
    evolved = {**ours, "fields": [*ours["fields"], {"name": "agent", "type": "string", "default": "none"}]}
    minimal = {"prompt_id": "p-text", "prompt": "1+1?", "samples": [{"completion": "2", "reward": 1.0},
                                                                   {"completion": "3", "reward": 0.0}]}  # fmt: skip
    messages = [
        apache_avro_message(ours, apache_record("p-ours", [1.0, 0.0])),
        apache_avro_message(evolved, apache_record("p-evolved", [0.0, 1.0, 0.5], agent="planner")),
        apache_avro_message(MINIMAL, minimal),
    ]
    names = topic_names(cfg)
    producer = kafka_clients.producer(cfg)  # a plain Kafka producer: the schema store is only a topic
    for fp, canonical, _ in messages:
        producer.send(names.schemas, key=fp.hex().encode(), value=canonical.encode())
    fake_fp = b"\x01" * 8  # a key that is not its own text's fingerprint
    producer.send(names.schemas, key=fake_fp.hex().encode(), value=messages[0][1].encode())
    producer.send(names.schemas, key=b"not a fingerprint", value=b"\xff\xfe")  # junk in the store is passed over
    for _, _, message in messages:
        producer.send(names.raw, key=b"outside", value=message)
    producer.send(names.raw, key=b"mislabelled", value=b"\xc3\x01" + fake_fp + messages[0][2][10:])
    producer.flush()
    producer.close()

    run_filters(cfg, store)
    codec = TrajectoryCodec(store)
    curated = {g.prompt_id: g for g in (codec.decode(r.value) for r in read_topic(cfg, names.curated))}
    assert set(curated) == {"p-ours", "p-evolved", "p-text"}
    assert curated["p-ours"].rewards.tolist() == [1.0, 0.0]
    assert curated["p-evolved"].rewards.tolist() == [0.0, 1.0, 0.5]
    text = curated.pop("p-text")  # completed by the filter: this job's ids, so this job's model
    assert text.rewards.tolist() == [1.0, 0.0] and text.model_id == "model" and text.group_id
    assert [s.token_ids.size == s.ref_logprobs.size > 0 for s in text.samples] == [True, True]
    for g in curated.values():
        assert g.generator_id == "apache-avro" and g.metadata == {"by": "apache"} and g.created_at == 1_700_000_000_000
        assert g.samples[0].token_ids.tolist() == [5, 6, 7, 8] and g.prompt_token_ids.tolist() == [3, 4, 5, 6]
    letters = [DeadLetterCodec(store).decode(r.value) for r in read_topic(cfg, names.dlq)]
    assert [(x.key, x.scorer) for x in letters] == [(b"mislabelled", "decode")]
    assert "not in the schema store" in letters[0].reason


@pytest.fixture
def completer() -> GroupCompleter:
    return GroupCompleter(tiny_llama(seed=1), char_tokenizer(), temperature=0.7)


def test_reference_logprobs_equal_a_separately_loaded_reference(completer):
    """A gateway-style group (token ids and behaviour log-probs, no reference log-probs) is completed with
    exactly what a searcher holding the reference computes."""
    tokenizer = char_tokenizer()
    generator = HFGenerator(tiny_llama(seed=0), tokenizer, tiny_llama(seed=1), temperature=0.7, max_new_tokens=12)
    prompt = generator.prompt_ids([{"role": "user", "content": "What is 3 + 4?"}])
    torch.manual_seed(0)
    completions = generator.sample([prompt], 4)[0]
    group = TrajectoryGroup("p", "t", "What is 3 + 4?", np.array(prompt, np.int32), [
        Sample(c.text, c.token_ids, c.logprobs, np.zeros(0, np.float32), 1.0, c.finish_reason) for c in completions
    ])  # fmt: skip
    assert group.missing() and completer.complete(group) is None and not group.missing()
    for c, s in zip(completions, group.samples, strict=True):
        np.testing.assert_allclose(s.ref_logprobs, c.ref_logprobs, atol=1e-5)
        assert s.token_ids is c.token_ids and s.logprobs is c.logprobs  # what came stays as it came


def test_a_text_only_group_is_tokenized_with_the_jobs_chat_template(completer):
    tokenizer = char_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "1+1?"}]  # fmt: skip
    chat = TrajectoryGroup("p", "", "", np.zeros(0, np.int32), [
        Sample("2", np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32), 1.0, "stop"),
        Sample("22", np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32), 0.0, "length"),
    ], messages=messages)  # fmt: skip
    assert completer.complete(chat) is None
    assert chat.prompt_token_ids.tolist() == chat_prompt_ids(tokenizer, messages)
    assert chat.prompt == tokenizer.decode(chat.prompt_token_ids)
    eos = tokenizer.eos_token_id
    assert [s.token_ids.tolist() for s in chat.samples] == [tokenizer("2")["input_ids"] + [eos],
                                                             tokenizer("22")["input_ids"]]  # fmt: skip
    ref = completer.reference_logprobs(chat.prompt_token_ids, [s.token_ids for s in chat.samples])
    assert all(
        np.array_equal(s.ref_logprobs, r) and s.logprobs.size == 0 for s, r in zip(chat.samples, ref, strict=True)
    )

    plain = TrajectoryGroup("p", "", "What is 1+1?", np.zeros(0, np.int32), [
        Sample("2", np.zeros(0, np.int32), np.full(3, -1.0, np.float32), np.zeros(0, np.float32), 1.0)])  # fmt: skip
    assert completer.complete(plain) == "sample 0: 3 logprobs but no token_ids to align them with"


def minimal_lines() -> list[dict]:
    """The least `tba produce` takes: a prompt (or messages), completions and rewards."""
    lines = []
    for i in range(6):
        a, b = i, i + 1
        samples = [{"completion": f"{a + b + d}", "reward": float(d == 0)} for d in (0, 1, -1, 2)]
        if i % 2:
            lines.append({"prompt_id": f"sum-{i}", "prompt": f"{a}+{b}=?", "samples": samples})
        else:
            messages = [{"role": "system", "content": "add"}, {"role": "user", "content": f"{a}+{b}"}]
            lines.append({"prompt_id": f"sum-{i}", "messages": messages, "samples": samples})
    return lines


def test_text_only_groups_from_tba_produce_are_completed_once_and_train(cfg, store, tmp_path, monkeypatch):
    monkeypatch.setattr("consumers.filter.ROUTE_BUDGET_S", 0.0)  # one group a transaction: the rest fetched again
    port = free_port()
    cfg = trainer_on_tiny_model(cfg, tmp_path)
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in minimal_lines()) + "\n")
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    result = CliRunner().invoke(cli, ["produce", str(path)])
    assert result.exit_code == 0, result.output
    assert "published 6 group(s)" in result.stdout

    run_filters(cfg, store)
    names = topic_names(cfg)
    codec = TrajectoryCodec(store)
    curated = [codec.decode(r.value) for r in read_topic(cfg, names.curated)]
    assert sorted(g.prompt_id for g in curated) == [f"sum-{i}" for i in range(6)]
    for g in curated:  # completed in the filter: what the buffer and any replay read
        assert not g.missing() and g.group_id and g.created_at > 0
        assert all(s.token_ids.size == s.ref_logprobs.size > 0 and s.logprobs.size == 0 for s in g.samples)
        assert g.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]

    stop = threading.Event()
    job = threading.Thread(target=run_trainer, args=(cfg, stop), kwargs={"metrics_port": port}, daemon=True)
    job.start()
    try:
        wait_until(lambda: scrape(port).get("tba_trainer_steps_total", 0) >= 3, 120, "three steps on text-only groups")
        assert scrape(port)["tba_trainer_buffer_groups"] == 6
        assert scrape(port).get("tba_trainer_rejected_groups_total", 0) == 0
    finally:
        stop.set()
        job.join(120)
    assert not job.is_alive()


def test_a_loss_that_weighs_by_behaviour_logprobs_refuses_groups_without_them(cfg, store, tmp_path):
    saved_tiny_llama(tmp_path / "model")
    cfg = with_overrides(cfg, searcher={"model": str(tmp_path / "model")}, trainer={"loss": "rloo"})
    groups_filter = GroupFilter(cfg, JobTopics(cfg, SchemaStore()))
    codec = TrajectoryCodec(SchemaStore())
    line = minimal_lines()[1]
    group = TrajectoryGroup(line["prompt_id"], "", line["prompt"], np.zeros(0, np.int32), [
        Sample(s["completion"], np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32), s["reward"])
        for s in line["samples"]])  # fmt: skip
    out = groups_filter.route(codec.encode(group))
    assert not out.accepted and out.scorer == "completion"
    assert "trainer.loss rloo needs behaviour log-probs to weigh a sample; sample 0 has none" in (
        DeadLetterCodec(SchemaStore()).decode(out.value).reason
    )
    assert groups_filter._completer is None  # refused before any model was loaded


def test_a_group_that_cannot_be_completed_goes_to_the_dlq_and_the_filter_goes_on(cfg, tmp_path):
    cfg = with_overrides(cfg, searcher={"model": saved_tiny_llama(tmp_path / "model")})
    groups_filter, codec = GroupFilter(cfg, JobTopics(cfg, SchemaStore())), TrajectoryCodec(SchemaStore())
    letters = DeadLetterCodec(SchemaStore())
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    long = TrajectoryGroup("p", "", "x" * 600, empty_i, [Sample("1", empty_i, empty_f, empty_f, 1.0)])
    out = groups_filter.route(codec.encode(long))
    assert (out.accepted, out.scorer) == (False, "completion")
    assert "past the reference model's context of 512" in letters.decode(out.value).reason

    class Broken:
        def complete(self, group):
            raise RuntimeError("template error")

    groups_filter._completer = Broken()
    short = TrajectoryGroup("p", "", "hi", empty_i, [Sample("1", empty_i, empty_f, empty_f, 1.0)])
    out = groups_filter.route(codec.encode(short))
    assert letters.decode(out.value).reason == "completion failed: RuntimeError: template error"
