"""`tba tail TOPIC` prints a topic's records decoded: where a group went, and why a dead letter was rejected."""

import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ops import kafka_clients
from ops.names import topic_names
from ops.topics import JobTopics
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import bad_nan_reward, synthetic_group
from tba.cli import cli
from tests.test_filter import run_filters


@pytest.fixture
def routed(cfg, store, monkeypatch):
    """Five groups and one with a NaN reward through the filter, and bytes that are no group of ours."""
    rng = np.random.default_rng(0)
    with TrajectoryProducer(cfg, store) as producer:
        for i in range(5):
            producer.send(synthetic_group(rng, i, samples=4, policy_version=2))
        producer.send(bad_nan_reward(synthetic_group(rng, 99)))
    stranger = kafka_clients.producer(cfg)
    stranger.send(topic_names(cfg).raw, key=b"k", value=b"not avro").get(timeout=30)
    stranger.close()
    run_filters(cfg, store)
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    return cfg


def tail(*args: str) -> list[str]:
    result = CliRunner().invoke(cli, ["tail", *args])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_tail_prints_each_topic_decoded_from_an_offset_or_a_time(routed):
    raw = tail("raw", "--from", "0")
    assert len(raw) == 7
    assert sum("undecodable" in line for line in raw) == 1
    assert {line.split(" prompt ")[1].split()[0] for line in raw if " group " in line} == {
        *(f"arith-{i}" for i in range(5)),
        "arith-99",
    }
    assert all(" v2 4 samples, rewards mean " in line for line in raw if "arith-" in line and "arith-99" not in line)

    curated = [json.loads(line) for line in tail("curated", "--from", "0", "--json")]
    assert sorted(c["value"]["prompt_id"] for c in curated) == [f"arith-{i}" for i in range(5)]
    sample = curated[0]["value"]["samples"][0]
    assert isinstance(sample["token_ids"], list) and len(sample["logprobs"]) == len(sample["token_ids"])
    assert {c["topic"] for c in curated} == {topic_names(routed).curated}

    letters = {d["value"]["scorer"]: d["value"] for d in map(json.loads, tail("dlq", "--json", "--from", "0"))}
    assert letters["finite_rewards"]["value"]["prompt_id"] == "arith-99"  # the rejected group itself
    assert base64.b64decode(letters["decode"]["value"]["base64"]) == b"not avro"
    (text,) = [line for line in tail("dlq") if "finite_rewards" in line]
    assert f"rejected {topic_names(routed).raw}:" in text and "reward is nan" in text

    assert tail("raw", "--from", "2099-01-01T00:00:00Z") == []  # nothing written after that time
    assert 1 <= len(tail("curated", "--last", "1")) <= routed.topics.partitions  # the last of each partition
    assert len(tail(topic_names(routed).curated)) == 5  # the full name does too

    wrong = CliRunner().invoke(cli, ["tail", "trajectories"])
    assert wrong.exit_code != 0 and "no topic 'trajectories' in this job: one of raw, curated, dlq" in str(
        wrong.exception
    )


def test_tail_follow_prints_what_arrives_until_stopped(routed, store):
    follow = subprocess.Popen([sys.executable, "-m", "tba.cli", "tail", "curated", "--follow"],
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy())  # fmt: skip
    try:
        seen = [follow.stdout.readline() for _ in range(5)]  # what curated held
        assert all(" group " in line for line in seen)
        with TrajectoryProducer(routed, topic=JobTopics(routed, store).curated) as producer:
            producer.send(synthetic_group(np.random.default_rng(1), 42, samples=4, policy_version=3))
        started = time.monotonic()
        line = follow.stdout.readline()
        assert " prompt arith-42 v3 " in line and time.monotonic() - started < 30
        follow.send_signal(signal.SIGTERM)
        assert follow.wait(timeout=10) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
