"""Each role its own Kafka principal, enforced by the broker's authorizer: `tba topics create` (as an admin)
grants each role only what it needs; a role where it does not belong is refused with one line naming its
principal, the operation, the resource and who may, and the job goes on."""

import os
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

from consumers.filter import FilterConsumer
from ops import kafka_clients
from ops.broker import LocalBroker, free_port
from ops.config import load_config
from ops.errors import AccessDenied
from ops.names import topic_names
from ops.topics import JobTopics, read_topic
from ops.trajectory_producer import TrajectoryProducer
from producers.policy_watch import PolicyWatch
from producers.synthetic import bad_nan_reward, synthetic_group
from trainer.curated_feed import CuratedFeed, curated_buffer

pytestmark = pytest.mark.slow  # a broker with SASL of its own

ROLES = ("searcher", "generator", "filter", "trainer", "gateway")
PASSWORDS = {user: f"{user} secret" for user in ("admin", *ROLES)}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    node = LocalBroker(tmp_path_factory.mktemp("acl-kafka"), port=free_port(), heap="512m", sasl_port=free_port(),
                       sasl_users=PASSWORDS, super_users=("admin",))  # fmt: skip
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def as_user(acl_broker, tmp_path_factory):
    """user -> that user's config in one namespace, whose topics and ACLs `tba topics create` made as admin."""
    namespace = f"acl{uuid.uuid4().hex[:8]}"
    env = {f"TBA_TEST_PASSWORD_{user.upper()}": password for user, password in PASSWORDS.items()}
    os.environ.update(env)

    def config(user):
        return load_config(environ={}, kafka={
            "bootstrap": f"127.0.0.1:{acl_broker.sasl_port}", "namespace": namespace, "client_timeout_s": 10,
            "security_protocol": "SASL_PLAINTEXT", "sasl_username": user,
            "sasl_password_env": f"TBA_TEST_PASSWORD_{user.upper()}", "principals": {role: role for role in ROLES},
        }, topics={"partitions": 2})  # fmt: skip

    path = tmp_path_factory.mktemp("acl-config") / "admin.yaml"
    path.write_text(config("admin").model_dump_json())
    run = tba(path, "topics", "create")
    assert run.returncode == 0, run.stderr
    assert f"allowed User:filter WRITE TRANSACTIONAL_ID {namespace}.filter.*" in run.stdout
    assert f"allowed User:generator WRITE TOPIC {namespace}.trajectories.raw" in run.stdout
    assert f"allowed User:gateway WRITE TOPIC {namespace}.trajectories.dlq" in run.stdout
    yield config
    for name in env:
        del os.environ[name]


def tba(config_path, *args):
    return subprocess.run([sys.executable, "-m", "tba.cli", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def write(cfg, groups, curated=False):
    """As cfg's principal, to raw or (curated) to curated, each with that principal's schema store."""
    topics = JobTopics(cfg)
    with TrajectoryProducer(cfg, topic=topics.curated if curated else topics.raw) as producer:
        for group in groups:
            producer.send(group)


def test_a_role_where_it_does_not_belong_is_refused_with_one_line(as_user, tmp_path):
    searcher, generator = as_user("searcher"), as_user("generator")
    rng = np.random.default_rng(0)
    curated = topic_names(searcher).curated

    with pytest.raises(AccessDenied) as refused:
        write(searcher, [synthetic_group(rng, 0)], curated=True)
    assert str(refused.value) == (f"kafka principal User:searcher may not write {curated}: only the filter's "
                                  "principal may (ACLs from `tba topics create`, kafka.principals)")  # fmt: skip

    with pytest.raises(AccessDenied, match=f"User:searcher may not read {curated}: only the trainer's principal"):
        CuratedFeed(searcher, curated_buffer(searcher, JobTopics(searcher).curated))

    with pytest.raises(AccessDenied, match=f"User:generator may not write {curated}: only the filter's principal"):
        write(generator, [synthetic_group(rng, 1)], curated=True)

    # a searcher's principal running a filter, from the command line: one line, no traceback
    path = tmp_path / "searcher.yaml"
    path.write_text(searcher.model_dump_json())
    run = tba(path, "filter", "--idle-exit", "1")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: kafka principal User:searcher may not write transactional id {searcher.kafka.namespace}.filter.0: "
        "only the filter's principal may (ACLs from `tba topics create`, kafka.principals)"
    ]

    # nothing the refused writers sent reached curated (the trainer may read it)
    assert read_topic(as_user("trainer"), curated) == []


def test_each_role_does_its_job_and_the_refusals_change_nothing(as_user):
    searcher, generator, filter_, trainer = (as_user(role) for role in ROLES[:4])
    names = topic_names(searcher)
    rng = np.random.default_rng(1)
    with pytest.raises(AccessDenied):  # refused first: the job below must not mind
        write(generator, [synthetic_group(rng, 0)], curated=True)

    write(searcher, [synthetic_group(rng, i) for i in range(6)] + [bad_nan_reward(synthetic_group(rng, 6))])
    write(generator, [synthetic_group(rng, i, generator_id="external") for i in range(7, 10)])

    worker = FilterConsumer(filter_)  # reads raw in its group, writes curated and dlq in transactions
    try:
        stats = worker.run(idle_exit_s=3)
    finally:
        worker.close()
    assert (stats.consumed, stats.accepted, dict(stats.rejected)) == (10, 9, {"finite_rewards": 1})

    buffer = curated_buffer(trainer, JobTopics(trainer).curated)
    feed = CuratedFeed(trainer, buffer)
    assert sum(feed.poll(timeout_ms=2000) for _ in range(5)) == 9
    feed.consumer.close()
    assert len(read_topic(as_user("admin"), names.dlq)) == 1  # dead letters are for operators to read

    # the trainer announces a policy version (as its weight service does); a searcher reads it
    version = SimpleNamespace(version=3, step=6, sha256=bytes(32), wall_time=0.0, model_id="m", dtype="float32",
                              nbytes=0)  # fmt: skip
    producer = kafka_clients.producer(trainer)
    JobTopics(trainer).policy_versions.produce(producer, version, key=b"policy").get(timeout=10)
    producer.close()
    searcher_topics = JobTopics(searcher)
    watch = PolicyWatch(searcher_topics.policy_versions)
    assert watch.poll() == 3
    watch.close()

    # a searcher seeds the prompts topic (the job-wide transactional id) and takes prompts in its group
    from policy.tasks import Problem
    from producers.prompt_feed import PromptFeed, seed_prompts

    assert seed_prompts(searcher_topics.prompts, [Problem(f"q{i}", f"{i} + 1 = ?", str(i + 1)) for i in range(4)]) == 4
    feed = PromptFeed(searcher_topics.prompts, "searcher-0", wait_s=20)
    try:
        assert sorted(p.prompt_id for p in feed.take(4)) == ["q0", "q1", "q2", "q3"]
        feed.commit()
    finally:
        feed.close()
