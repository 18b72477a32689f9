"""The `tba` commands a newcomer types: kafka start|status|stop, topics create|describe, demo."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ops.broker import free_port
from ops.names import topic_names
from tba.cli import cli

pytestmark = pytest.mark.slow  # the command line in processes of its own, and a broker


def tba(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tba.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def library_lines(stderr: str) -> list[str]:
    """The lines kafka-python's loggers wrote (format: date time logger level message)."""
    return [line for line in stderr.splitlines() if line.count(" ") >= 3 and line.split()[2].startswith("kafka")]


def test_kafka_start_status_stop(tmp_path):
    port = free_port()
    config = tmp_path / "tba.yaml"
    config.write_text(f"broker:\n  port: {port}\n  data_dir: {tmp_path / 'kafka'}\n  heap: 512m\n")
    env = {**os.environ, "TBA_CONFIG": str(config)}
    assert tba("kafka", "status", env=env).returncode == 1
    started = tba("kafka", "start", env=env)
    assert started.returncode == 0, started.stderr
    assert f"bootstrap 127.0.0.1:{port}" in started.stdout
    # one line of ours says what is waited for; kafka-python's refused connections meanwhile are debug lines
    assert f"waiting for Kafka at 127.0.0.1:{port} to start" in started.stderr
    assert library_lines(started.stderr) == []
    again = tba("kafka", "start", env=env)
    assert again.stdout == started.stdout  # same pid: one broker
    status = tba("kafka", "status", env=env)
    assert status.returncode == 0 and str(tmp_path / "kafka") in status.stdout
    assert tba("kafka", "stop", env=env).stdout.strip() == "kafka stopped"
    assert tba("kafka", "status", env=env).returncode == 1


def test_topics_create_is_idempotent_and_describe_shows_their_config(broker, monkeypatch):
    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", broker.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", "cmdtopics")
    monkeypatch.setenv("TBA__TOPICS__PARTITIONS", "2")
    runner = CliRunner()
    first = runner.invoke(cli, ["topics", "create"])
    assert first.exit_code == 0 and first.output.count("created") == 6
    assert runner.invoke(cli, ["topics", "create"]).output.strip() == "all topics exist"
    rows = {r["topic"]: r for r in map(json.loads, runner.invoke(cli, ["topics", "describe"]).output.splitlines())}
    assert rows["cmdtopics.trajectories.raw"]["partitions"] == 2
    assert rows["cmdtopics.trajectories.raw"]["retention.ms"] == str(72 * 3_600_000)
    assert rows["cmdtopics.trajectories.raw"]["retention.bytes"] == str(10 * 10**9)  # 20 GB over 2 partitions
    assert rows["cmdtopics.trajectories.dlq"]["retention.bytes"] == str(5 * 10**9)
    assert rows["cmdtopics.trajectories.curated"]["retention.ms"] == "-1"
    assert rows["cmdtopics.trajectories.curated"]["retention.bytes"] == "-1"  # the history: never by size
    assert rows["cmdtopics.schemas"]["cleanup.policy"] == "compact"
    assert rows["cmdtopics.policy.versions"]["cleanup.policy"] == "compact"
    # the searchers cycle through the prompts for the whole job: as many partitions as raw, kept forever
    assert rows["cmdtopics.prompts"]["partitions"] == 2 and rows["cmdtopics.prompts"]["retention.ms"] == "-1"


def test_a_bad_config_names_the_field_and_exits_non_zero(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("buffer:\n  on_policy_prob: 2\n")
    result = tba("--config", str(config), "topics", "describe")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: config error: buffer.on_policy_prob: Input should be less than or equal to 1 (got 2)"
    )


def test_the_demo_runs_end_to_end(broker, monkeypatch):
    """The data-plane demo (`tba demo`), on a smaller stream."""
    from ops.config import load_config
    from tba.demo import run_demo

    cfg = load_config(
        environ={},
        kafka={"bootstrap": broker.bootstrap, "namespace": "demotest"},
        broker={"port": broker.port, "data_dir": str(broker.data_dir)},
        demo={"groups": 300, "bad_fraction": 0.1},
    )
    result = run_demo(cfg)
    expected_bad = result["expected_bad"]
    assert result["rejected"] == expected_bad
    assert result["accepted"] == 300 - sum(expected_bad.values()) + 1  # +1: the undecodable record is extra
    assert result["buffer"] == result["accepted"]
    assert topic_names(cfg).raw == "demotest.trajectories.raw"


def test_a_missing_model_path_is_one_clear_error(broker, tmp_path):
    config = tmp_path / "tba.yaml"
    config.write_text(
        f"kafka:\n  bootstrap: {broker.bootstrap}\n  namespace: nomodel\nsearcher:\n  model: {tmp_path / 'nowhere'}\n"
    )
    result = tba("--config", str(config), "search", "--batches", "1")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: searcher.model: cannot load a model from") and "nowhere" in last


def test_a_command_before_kafka_answers_says_what_it_waits_for_and_library_lines_only_when_verbose():
    env = {**os.environ, "TBA__KAFKA__BOOTSTRAP": f"127.0.0.1:{free_port()}", "TBA__KAFKA__NAMESPACE": "nobody",
           "TBA__KAFKA__CLIENT_TIMEOUT_S": "2"}  # fmt: skip
    quiet = tba("topics", "describe", env=env)
    assert quiet.returncode == 2
    assert f"waiting for Kafka at kafka.bootstrap={env['TBA__KAFKA__BOOTSTRAP']} to answer" in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: no Kafka broker answered")
    assert library_lines(quiet.stderr) == [] and len(quiet.stderr.strip().splitlines()) == 2
    verbose = tba("--verbose", "topics", "describe", env=env)
    assert verbose.returncode == 2 and any("ECONNREFUSED" in line for line in library_lines(verbose.stderr))
