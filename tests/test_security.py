"""Kafka security passes from config to every client: a broker with a SASL/PLAIN listener admits the
right password and refuses a wrong one with one line saying what to fix, never printing the secret."""

import os
import subprocess
import sys

import pytest

from ops.broker import LocalBroker, free_port
from ops.config import load_config
from ops.errors import BrokerError
from ops.names import topic_names
from ops.topics import create_topics, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import synthetic_group

pytestmark = pytest.mark.slow  # a broker with SASL of its own, and the command line in processes of its own
PASSWORD = 'correct "horse" \\ saddle'  # a quote and a backslash: the broker's JAAS line and properties escape them


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    node = LocalBroker(tmp_path_factory.mktemp("sasl-kafka"), port=free_port(), heap="512m",
                       sasl_port=free_port(), sasl_users={"searcher": PASSWORD})  # fmt: skip
    node.start()
    yield node
    node.stop()


def sasl_config(node, **kafka):
    return load_config(environ={}, kafka={"bootstrap": f"127.0.0.1:{node.sasl_port}", "namespace": "secure",
                                          "security_protocol": "SASL_PLAINTEXT", "sasl_username": "searcher",
                                          "client_timeout_s": 10, **kafka})  # fmt: skip


def test_the_right_password_works_and_a_wrong_one_is_refused(sasl_broker, monkeypatch, tmp_path, rng):
    cfg = sasl_config(sasl_broker)
    monkeypatch.setenv("TBA_KAFKA_PASSWORD", PASSWORD)
    create_topics(cfg)
    with TrajectoryProducer(cfg) as producer:
        producer.send(synthetic_group(rng, 0))
    assert len(read_topic(cfg, topic_names(cfg).raw)) == 1

    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.delenv("TBA_KAFKA_PASSWORD")  # from a file instead of the environment
    assert len(read_topic(sasl_config(sasl_broker, sasl_password_file=str(secret)), topic_names(cfg).raw)) == 1

    monkeypatch.setenv("TBA_KAFKA_PASSWORD", "battery staple")
    with pytest.raises(BrokerError, match=r"refused user 'searcher' \(PLAIN\): check kafka.sasl_username and the "
                       r"password in \$TBA_KAFKA_PASSWORD") as refused:  # fmt: skip
        create_topics(cfg)
    assert "battery" not in str(refused.value)


def test_the_command_line_says_what_to_fix_and_never_prints_the_password(sasl_broker, tmp_path):
    config = tmp_path / "tba.yaml"
    config.write_text(sasl_config(sasl_broker).model_dump_json())
    env = {**os.environ, "TBA_KAFKA_PASSWORD": "battery staple"}
    run = subprocess.run([sys.executable, "-m", "tba.cli", "--config", str(config), "topics", "create"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: Kafka at 127.0.0.1:")
    assert "battery staple" not in run.stdout + run.stderr

    del env["TBA_KAFKA_PASSWORD"]
    run = subprocess.run([sys.executable, "-m", "tba.cli", "--config", str(config), "topics", "create"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert "kafka.sasl_password_env: set the environment variable TBA_KAFKA_PASSWORD" in run.stderr


def test_an_unreachable_broker_is_one_clear_error(tmp_path):
    config = tmp_path / "tba.yaml"
    config.write_text(f"kafka:\n  bootstrap: 127.0.0.1:{free_port()}\n  client_timeout_s: 3\n")
    run = subprocess.run([sys.executable, "-m", "tba.cli", "--config", str(config), "topics", "create"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert "no Kafka broker answered at kafka.bootstrap=127.0.0.1:" in run.stderr.strip().splitlines()[-1]
