"""A 3-broker cluster, replication factor 3, min.insync.replicas 2, under a steady load of groups:
one broker lost -> producers carry on within 30 s; two lost -> sends fail loudly instead of being
acked; brought back -> every acked group is there."""

import time

import pytest

from ops.config import with_overrides
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, create_topics, read_topic
from schemas.records import TrajectoryCodec
from tests.conftest import make_config
from tests.fault_injection import Load
from tests.local_cluster import LocalCluster

pytestmark = pytest.mark.slow  # a three-broker cluster


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def test_losing_one_then_two_of_three_brokers_loses_no_acked_group(tmp_path):
    cluster = LocalCluster(tmp_path / "cluster", size=3, heap="512m")
    cluster.start()
    try:
        topics = {"partitions": 2, "replication_factor": 3, "min_insync_replicas": 2}
        cfg = make_config(cluster.bootstrap, topics=topics)
        cfg = with_overrides(cfg, kafka={"client_timeout_s": 10})
        create_topics(cfg)
        load = Load(cfg, per_s=20, vocab=128)
        load.thread.start()
        try:
            wait_for(lambda: len(load.acked) >= 40, 60, "the first acks")

            cluster.nodes[2].kill()  # one of three: the other two still make min.insync.replicas
            before = len(load.acked)
            recovered = wait_for(lambda: len(load.acked) >= before + 40, 30, "acks to go on after one broker died")
            print(f"acks went on {recovered:.1f}s after losing one broker")

            cluster.nodes[1].kill()  # two of three: no write can reach two replicas
            failed = load.failed  # what was in flight has settled once a send fails: acked before the loss, or not
            wait_for(lambda: load.failed > failed, 60, "the first send to fail with two brokers down")
            acked, failed = len(load.acked), load.failed
            wait_for(lambda: load.failed > failed, 60, "sends to fail loudly with two brokers down")
            assert len(load.acked) == acked  # nothing acked without two replicas

            for node in cluster.nodes[1:]:
                node.start()
            wait_for(lambda: len(load.acked) >= acked + 20, 120, "acks after the brokers came back")
        finally:
            load.stop.set()
            load.thread.join(120)
        codec = TrajectoryCodec(KafkaSchemaStore(cfg))
        stored = {codec.decode(r.value).group_id for r in read_topic(cfg, topic_names(cfg).raw)}
        assert load.acked and not load.acked - stored, f"{len(load.acked - stored)} acked groups lost"
    finally:
        cluster.stop()
