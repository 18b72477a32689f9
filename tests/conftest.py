"""One real Kafka broker for the whole suite (started here, stopped at the end); a namespace per test."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from ops.broker import LocalBroker, free_port
from ops.config import TbaConfig, load_config, with_overrides
from ops.topics import KafkaSchemaStore, create_topics


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: needs no Kafka, vLLM engine, job processes or namespaces (`-m fast`)")
    config.addinivalue_line("markers", "slow: starts its own broker, vLLM engine, job processes or network namespaces")


def pytest_collection_modifyitems(items):
    """The fast tier for the edit-test loop: every test that uses no broker and is not marked slow."""
    for item in items:
        if "broker" not in item.fixturenames and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    node = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port(), heap="768m")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def registry(broker, tmp_path_factory):
    """The schema registry (Apicurio Registry, Confluent's REST API), its schemas in the suite's broker."""
    from ops.registry import LocalRegistry

    node = LocalRegistry(tmp_path_factory.mktemp("registry"), broker.bootstrap, port=free_port())
    node.start()
    yield node
    node.stop()


def make_config(bootstrap: str, **sections) -> TbaConfig:
    sections.setdefault("topics", {"partitions": 3})
    # tests train full weights of tiny models unless they ask for LoRA (the CPU job's default)
    sections["trainer"] = {"lora_r": 0, **sections.get("trainer", {})}
    kafka = {"bootstrap": bootstrap, "namespace": f"t{uuid.uuid4().hex[:10]}", "client_timeout_s": 20}
    return load_config(environ={}, kafka=kafka, **sections)


def first_batch(searcher, timeout_s: float = 120.0) -> list:
    """A new searcher's first groups: its first steps take nothing while it joins the searchers' group over the
    prompts topic, which on a loaded machine outlasts a step's wait for prompts."""
    deadline = time.monotonic() + timeout_s
    while not (groups := searcher.step()):
        assert time.monotonic() < deadline, f"the searcher took no prompts in {timeout_s}s"
    return groups


def trainer_on_tiny_model(cfg: TbaConfig, tmp_path) -> TbaConfig:
    """cfg for a trainer of a saved tiny model on the toy task, training on whatever reaches curated."""
    from tests.tiny_models import saved_tiny_llama

    return with_overrides(
        cfg,
        task={"name": "toy", "train_size": 4, "eval_size": 2},
        searcher={"model": saved_tiny_llama(tmp_path / "model")},
        # the few groups a test writes are trained on as often as it needs (the replay bound: test_trainer.py)
        buffer={"samples_per_prompt": 4, "max_replay_ratio": 0},
        trainer={"prompts_per_step": 2, "min_buffer_prompts": 2, "max_steps": 100_000, "eval_every": 100_000,
                 "eval_prompts": 2, "eval_max_new_tokens": 4, "run_dir": str(tmp_path / "run")},
        weights={"port": 0},
    )  # fmt: skip


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
