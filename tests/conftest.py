"""One real Kafka broker for the whole suite (started here, stopped at the end); a namespace per test."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from ops.broker import LocalBroker, free_port
from ops.config import TbaConfig, load_config
from ops.schema_store import KafkaSchemaStore
from ops.topics import create_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    node = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), heap="768m")
    node.start()
    yield node
    node.stop()


def make_config(bootstrap: str, **sections) -> TbaConfig:
    sections.setdefault("topics", {"partitions": 3})
    # tests train full weights of tiny models unless they ask for LoRA (the CPU job's default)
    sections["trainer"] = {"lora_r": 0, **sections.get("trainer", {})}
    kafka = {"bootstrap": bootstrap, "namespace": f"t{uuid.uuid4().hex[:10]}", "client_timeout_s": 20}
    return load_config(environ={}, kafka=kafka, **sections)


@pytest.fixture
def cfg(broker) -> TbaConfig:
    config = make_config(broker.bootstrap)
    create_topics(config)
    return config


@pytest.fixture
def store(cfg) -> KafkaSchemaStore:
    return KafkaSchemaStore(cfg)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
