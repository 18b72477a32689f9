"""The local broker and cluster are real Kafka processes: start, status, idempotence, stop, N nodes."""

from kafka.admin import NewTopic

from ops import kafka_clients
from ops.broker import LocalBroker, LocalCluster, free_port
from tests.conftest import make_config


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
