"""`tba inspect` reads a job's state back from Kafka: versions, rewards, dead letters, lag, weights."""

import io
import json

import numpy as np
from click.testing import CliRunner
from rich.console import Console

from ops import kafka_clients
from ops.config import with_overrides
from ops.names import topic_names
from ops.trajectory_producer import TrajectoryProducer
from producers.synthetic import bad_nan_reward, synthetic_group
from tba.cli import cli
from tba.inspection import inspect_job, print_tables
from tests.test_filter import run_filters
from tests.tiny_models import tiny_llama
from trainer.weight_sync import WeightSyncServer


def test_inspect_reports_what_the_topics_hold(cfg, store, monkeypatch):
    rng = np.random.default_rng(0)
    with TrajectoryProducer(cfg, store) as producer:
        for i in range(30):
            producer.send(synthetic_group(rng, i, samples=4, policy_version=0 if i < 20 else 1))
        for i in range(3):
            producer.send(bad_nan_reward(synthetic_group(rng, 100 + i)))
    run_filters(cfg, store)
    server = WeightSyncServer(with_overrides(cfg, weights={"port": 0}))
    server.start()
    for v in range(2):
        server.wait_published(server.publish(tiny_llama(v).state_dict(), step=10 * v))
    server.stop()
    stranger = kafka_clients.producer(cfg)  # bytes that are no dead letter of ours
    stranger.send(topic_names(cfg).dlq, value=b"not avro").get(timeout=30)
    stranger.close()

    report = inspect_job(cfg)
    assert report["dlq_by_scorer"]["undecodable letter"]["records"] == 1
    assert {v: x["groups"] for v, x in report["curated_by_policy_version"].items()} == {"0": 20, "1": 10}
    assert report["dlq_by_scorer"]["finite_rewards"]["records"] == 3
    assert "reward is nan" in report["dlq_by_scorer"]["finite_rewards"]["example"]
    assert sum(report["filter_lag"].values()) == 0
    assert [(p["version"], p["step"]) for p in report["policy_versions"]] == [(0, 0), (1, 10)]

    monkeypatch.setenv("TBA__KAFKA__BOOTSTRAP", cfg.kafka.bootstrap)
    monkeypatch.setenv("TBA__KAFKA__NAMESPACE", cfg.kafka.namespace)
    out = CliRunner().invoke(cli, ["inspect", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["curated_by_policy_version"]["1"]["groups"] == 10
    tables = CliRunner().invoke(cli, ["inspect"])
    assert tables.exit_code == 0 and "dead letters by scorer" in tables.output

    # at 80 columns nothing is cut: whole topic names, whole headers
    console = Console(file=io.StringIO(), width=80)
    print_tables(report, console)
    text = console.file.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert all(name in text for name in vars(topic_names(cfg)).values())
    headers = ("topic", "figures and settings", "raw partition", "records", "version", "groups", "mean_reward",
               "scorer", "example", "step", "sha256", "published_at")  # fmt: skip
    assert all(header in text for header in headers)
