"""The local broker and cluster are real Kafka processes: start, status, idempotence, stop, N nodes."""

import os
import socket
import time

import pytest
from kafka.admin import NewTopic

from ops import kafka_clients
from ops.broker import LocalBroker, _cluster_id, free_port
from ops.errors import BrokerError
from tests.conftest import make_config
from tests.local_cluster import LocalCluster
from tests.test_commands import tba

pytestmark = pytest.mark.slow  # its own brokers and clusters


def test_start_is_idempotent_and_status_tells_port_pid_dir(broker):
    again = LocalBroker(broker.data_dir, broker.port)
    first = broker.status()
    assert again.start() == first  # no second process
    assert first.port == broker.port and first.data_dir == broker.data_dir
    assert broker.log_file.read_text().count("Kafka Server started") >= 1


def test_stop_then_restart_on_the_same_data_dir_keeps_topics(tmp_path):
    node = LocalBroker(tmp_path / "k", port=free_port(), heap="512m")
    node.start()
    cfg = make_config(node.bootstrap)
    admin = kafka_clients.admin(cfg)
    admin.create_topics([NewTopic("kept", 1, 1)])
    admin.close()
    assert node.stop() is True
    assert node.status() is None
    assert node.stop() is False
    node.start()
    admin = kafka_clients.admin(cfg)
    assert "kept" in admin.list_topics()
    admin.close()
    node.stop()


def test_three_node_cluster_replicates(tmp_path):
    cluster = LocalCluster(tmp_path / "c", size=3, heap="512m")
    cluster.start()
    try:
        ports = {s.port for s in (n.status() for n in cluster.nodes)}
        assert len(ports) == 3
        cfg = make_config(cluster.bootstrap)
        admin = kafka_clients.admin(cfg)
        admin.create_topics([NewTopic("replicated", 2, 3, topic_configs={"min.insync.replicas": "2"})])
        (meta,) = admin.describe_topics(["replicated"])
        admin.close()
        assert all(len(p["replica_nodes"]) == 3 for p in meta["partitions"])
        producer = kafka_clients.producer(cfg)
        md = producer.send("replicated", key=b"k", value=b"v").get(timeout=30)
        producer.close()
        assert md.offset == 0
    finally:
        cluster.stop()


def test_kafka_start_on_a_port_another_program_holds_says_so_at_once_and_how_to_move_it(tmp_path):
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        env = {**os.environ, "TBA__BROKER__PORT": str(port), "TBA__BROKER__DATA_DIR": str(tmp_path / "kafka")}
        started = time.monotonic()
        result = tba("kafka", "start", env=env)
        assert time.monotonic() - started < 15  # not Kafka's 30 s on a server that is not Kafka
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is taken by another program" in result.stderr
    assert "broker.port (environment TBA__BROKER__PORT)" in result.stderr
    assert not (tmp_path / "kafka" / "node.json").exists()  # no broker was launched


def test_a_broker_that_dies_during_start_is_explained_by_its_first_error(tmp_path):
    node = LocalBroker(tmp_path / "k", port=free_port(), heap="256m")
    controller_port = free_port()
    node.configure({1: controller_port}, _cluster_id())
    node.log_file.write_text("[2020-01-01 00:00:00,000] ERROR an old start's error (kafka.Old)\n")
    with socket.socket() as taken:  # the controller listener cannot bind: the node dies after starting
        taken.bind(("127.0.0.1", controller_port))
        taken.listen()
        started = time.monotonic()
        with pytest.raises(BrokerError) as failure:
            node.start(timeout_s=60)
        assert time.monotonic() - started < 25
    message = str(failure.value)
    assert message.startswith("Kafka node 1 exited during start; its first error")
    assert f"Socket server failed to bind to 127.0.0.1:{controller_port}: Address already in use" in message
    assert "an old start's error" not in message and len(message.splitlines()) == 3
