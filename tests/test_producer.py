"""TrajectoryProducer and the external-generator path (`tba produce FILE.jsonl`) against the real broker."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from kafka.admin import NewTopic

from ops import kafka_clients
from ops.errors import DeliveryError
from ops.names import topic_names
from ops.topics import COMMITTED, Topic, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import synthetic_group
from schemas.records import TrajectoryCodec
from tba.cli import cli


def test_groups_arrive_keyed_by_prompt_id(cfg, store, rng):
    groups = [synthetic_group(rng, i % 5) for i in range(40)]
    with TrajectoryProducer(cfg, store) as producer:
        for g in groups:
            producer.send(g)
    assert producer.acked == 40
    records = read_topic(cfg, topic_names(cfg).raw)
    codec = TrajectoryCodec(store)
    assert sorted(codec.decode(r.value).group_id for r in records) == sorted(g.group_id for g in groups)
    by_key = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())  # one prompt, one partition: ordered


def test_delivery_failure_reaches_the_caller(cfg, store, rng):
    admin = kafka_clients.admin(cfg)
    tiny = Topic(
        cfg, "tiny-" + cfg.kafka.namespace, 1, {"max.message.bytes": "2048"}, COMMITTED, TrajectoryCodec, store
    )
    admin.create_topics([NewTopic(tiny.name, tiny.partitions, 1, topic_configs=tiny.config)])
    admin.close()
    producer = TrajectoryProducer(cfg, topic=tiny)
    producer.send(synthetic_group(rng, 1, samples=8, tokens=200))  # ~10 KiB: the broker refuses it
    with pytest.raises(DeliveryError, match="not acknowledged"):
        producer.flush()
    producer.close()


def jsonl_line(rng, **changes) -> str:
    g = synthetic_group(rng, int(rng.integers(100)), samples=2, tokens=6)
    line = {
        "prompt_id": g.prompt_id,
        "task": g.task,
        "prompt": g.prompt,
        "prompt_token_ids": g.prompt_token_ids.tolist(),
        "samples": [
            {
                "completion": s.completion,
                "token_ids": s.token_ids.tolist(),
                "logprobs": s.logprobs.tolist(),
                "ref_logprobs": s.ref_logprobs.tolist(),
                "reward": s.reward,
            }
            for s in g.samples
        ],
        "generator_id": "my-generator",
    }
    line.update(changes)
    return json.dumps(line)


def test_tba_produce_publishes_valid_lines_and_reports_invalid_ones(cfg, store, rng, tmp_path, monkeypatch):
    bad_lengths = json.loads(jsonl_line(rng))
    bad_lengths["samples"][0]["logprobs"].pop()
    lines = [
        jsonl_line(rng, group_id="g-1"),
        "{not json",
        jsonl_line(rng, group_id="g-2"),
        json.dumps(bad_lengths),
        jsonl_line(rng, samples=[]),
        jsonl_line(rng, prompt_token_ids=[2**40]),
        "",
        jsonl_line(rng, group_id="g-3", colour="red"),
        jsonl_line(rng, group_id="g-4"),
    ]
    path = tmp_path / "external.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    result = CliRunner().invoke(cli, ["produce", str(path)])
    assert result.exit_code == 1, result.output
    assert "published 3 group(s); 5 invalid line(s) skipped" in result.stdout
    assert f"{path}:2: not JSON" in result.stderr
    n = len(bad_lengths["samples"][0]["token_ids"])
    assert f"{path}:4: samples.0: Value error, {n - 1} logprobs for {n} token_ids (give one per token, or none)" in (
        result.stderr
    )
    assert f"{path}:5: samples: List should have at least 1 item" in result.stderr
    assert f"{path}:6: " in result.stderr
    assert f"{path}:8: colour: Extra inputs are not permitted" in result.stderr
    codec = TrajectoryCodec(store)
    groups = [codec.decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert sorted(g.group_id for g in groups) == ["g-1", "g-2", "g-4"]
    assert all(g.generator_id == "my-generator" and g.policy_version == -1 for g in groups)
    assert all(s.token_ids.dtype == np.dtype("<i4") for g in groups for s in g.samples)


def test_a_group_over_the_message_size_is_reported_and_the_lines_after_it_are_published(cfg, store, rng, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    n = 200_000  # ~2.4 MB of ids and log-probs: over a 1 MiB kafka.max_message_bytes
    huge = json.loads(jsonl_line(rng, group_id="huge"))
    huge["samples"][0].update(token_ids=[1] * n, logprobs=[-0.5] * n, ref_logprobs=[-0.5] * n)
    path = tmp_path / "external.jsonl"
    path.write_text("\n".join([jsonl_line(rng, group_id="g-1"), json.dumps(huge), jsonl_line(rng, group_id="g-2")]))
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    monkeypatch.setenv("TBA__KAFKA__MAX_MESSAGE_BYTES", str(1024 * 1024))
    result = CliRunner().invoke(cli, ["produce", str(path)])
    assert result.exit_code == 1, result.output
    assert "published 2 group(s); 1 invalid line(s) skipped" in result.stdout
    assert f"{path}:2: group is " in result.stderr and "over kafka.max_message_bytes (1048576)" in result.stderr
    assert "Traceback" not in result.output
    groups = [TrajectoryCodec(store).decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
    assert sorted(g.group_id for g in groups) == ["g-1", "g-2"]
