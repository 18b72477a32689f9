"""Confluent's wire format (0x00, a 4-byte schema id, the Avro body) through a job, with clients nobody here wrote:
confluent-kafka's AvroSerializer and Producer write raw, its Consumer and AvroDeserializer read curated and the
dlq back; the schema registry is the real one (tests/test_registry.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from consumers.filter import GroupFilter
from ops.broker import free_port
from ops.config import with_overrides
from ops.errors import DecodeError, RegistryError
from ops.names import topic_names
from ops.topics import JobTopics, KafkaSchemaStore
from schemas.codec import load_schema
from tests.test_filter import run_filters
from tests.test_outside_generators import apache_record
from tests.test_tail import tail


def registry_client_conf(url: str) -> dict:
    """As a writer configures its client: once, the first request after the registry started got no answer at
    all (the registry logged its 404 as sent), and without a timeout the client waits forever instead of retrying."""
    return {"url": url, "timeout": 30}


def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list:
    """count messages of a topic, from its start, as librdkafka reads them (read_committed by default)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    messages, deadline = [], time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            messages.append(message)
    consumer.close()
    assert len(messages) == count, f"{len(messages)} of {count} messages on {topic}"
    return messages


def test_confluent_writers_reach_curated_and_confluent_readers_read_curated_and_the_dlq(cfg, registry, monkeypatch):
    cfg = with_overrides(cfg, kafka={"schema_registry_url": registry.url, "wire_format": "confluent"})
    names = topic_names(cfg)
    client = SchemaRegistryClient(registry_client_conf(registry.url))
    ours = load_schema("trajectory_group")
    evolved = {**ours, "fields": [*ours["fields"], {"name": "agent", "type": "string", "default": "none"}]}
    broken = {**ours, "fields": [*ours["fields"], {"name": "judge", "type": "string"}]}  # no default: refused

    raw = SerializationContext(names.raw, MessageField.VALUE)
    framed = [
        AvroSerializer(client, json.dumps(ours))(apache_record("p-ours", [1.0, 0.0]), raw),
        AvroSerializer(client, json.dumps(evolved))(apache_record("p-evolved", [0.0, 1.0, 0.5], agent="planner"), raw),
    ]
    with pytest.raises(SchemaRegistryError) as refused:  # reported to the writer, never written
        AvroSerializer(client, json.dumps(broken))(apache_record("p-broken", [1.0, 0.0], judge="x"), raw)
    assert refused.value.http_status_code == 409
    assert [m[0] for m in framed] == [0, 0]
    assert [v.version for v in [client.get_latest_version(f"{names.raw}-value")]] == [2]
    unknown = b"\x00" + (987_654).to_bytes(4, "big") + framed[0][5:]
    other = {"type": "record", "name": "Other", "fields": [{"name": "n", "type": "int"}]}  # not a group at all
    other_id = client.register_schema("other-value", Schema(json.dumps(other), "AVRO"))
    foreign = b"\x00" + other_id.to_bytes(4, "big") + b"\x0a"  # {"n": 5}

    producer = Producer({"bootstrap.servers": cfg.kafka.bootstrap, "acks": "all"})
    for value in [*framed, unknown, foreign]:
        producer.produce(names.raw, key=b"outside", value=value)
    assert producer.flush(30) == 0
    del producer  # librdkafka's client ends with its last reference
    store = KafkaSchemaStore(cfg)
    run_filters(cfg, store)

    # our writers wrote Confluent's framing, registered under <topic>-value: any Confluent reader reads them
    read = AvroDeserializer(client)
    curated = read_all(cfg.kafka.bootstrap, names.curated, 2)
    curated_id = client.get_latest_version(f"{names.curated}-value").schema_id
    assert {int.from_bytes(m.value()[1:5], "big") for m in curated} == {curated_id}
    groups = {g["prompt_id"]: g for g in (read(m.value(), SerializationContext(names.curated, MessageField.VALUE))
                                           for m in curated)}  # fmt: skip
    assert set(groups) == {"p-ours", "p-evolved"}
    assert [s["reward"] for s in groups["p-evolved"]["samples"]] == [0.0, 1.0, 0.5]
    assert groups["p-ours"]["generator_id"] == "apache-avro"
    letters = {m["value"]: m for m in (read(m.value(), SerializationContext(names.dlq, MessageField.VALUE))
                                        for m in read_all(cfg.kafka.bootstrap, names.dlq, 2))}  # fmt: skip
    assert {m["scorer"] for m in letters.values()} == {"decode"}
    assert "refused schema id 987654" in letters[unknown]["reason"]
    assert f"writer schema id {other_id} (Other) cannot be read as tba.TrajectoryGroup" in letters[foreign]["reason"]

    # `tba tail` reads either framing: raw holds Confluent writers' records, decoded like any other
    for field, value in (("bootstrap", cfg.kafka.bootstrap), ("namespace", cfg.kafka.namespace),
                         ("schema_registry_url", registry.url)):  # fmt: skip
        monkeypatch.setenv(f"TBA__KAFKA__{field.upper()}", value)
    shown = [json.loads(line) for line in tail("raw", "--from", "0", "--json")]
    assert [r.get("value", {}).get("prompt_id") for r in shown] == ["p-ours", "p-evolved", None, None]
    assert "schema id 987654" in shown[2]["undecodable"] and "cannot be read" in shown[3]["undecodable"]

    # and our own writer is told when the registry refuses its schema: another program's Prompt, which ours
    # (a prompt_id without a default) cannot read, came first under the subject
    theirs = {"type": "record", "name": "Prompt", "namespace": "tba", "fields": [{"name": "n", "type": "int"}]}
    client.register_schema(f"{names.prompts}-value", Schema(json.dumps(theirs), "AVRO"))
    with pytest.raises(RegistryError, match=f"refused Prompt under the subject {names.prompts}-value"):
        _ = JobTopics(cfg).prompts.codec  # made on first use, registering its schema


class LateListener:
    """The registry's port forwarded, but only from some seconds on: a registry that comes back during a retry."""

    def __init__(self, target_port: int, after_s: float):
        self.port, self.target, self.after_s = free_port(), target_port, after_s
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        time.sleep(self.after_s)
        server = socket.create_server(("127.0.0.1", self.port))
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with source, sink:
            while data := source.recv(65536):
                sink.sendall(data)


def test_an_unreachable_registry_is_retried_then_its_records_go_to_the_dlq_with_the_reason(cfg, registry):
    schema_id = SchemaRegistryClient(registry_client_conf(registry.url)).register_schema(
        f"{topic_names(cfg).raw}-value", Schema(json.dumps(load_schema("trajectory_group")), "AVRO")
    )
    late = LateListener(registry.port, after_s=2.0)
    url = registry.url.replace(f":{registry.port}", f":{late.port}")
    store = KafkaSchemaStore(with_overrides(cfg, kafka={"schema_registry_url": url, "client_timeout_s": 20}))
    started = time.monotonic()
    assert store.by_id(schema_id)["name"] == "tba.TrajectoryGroup"  # asked again until it answered
    assert time.monotonic() - started >= 1.5

    gone = with_overrides(cfg, kafka={"schema_registry_url": f"http://127.0.0.1:{free_port()}", "client_timeout_s": 2})
    routes = GroupFilter(gone, JobTopics(gone, KafkaSchemaStore(gone)))
    started = time.monotonic()
    routed = routes.route(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02", key=b"k")
    assert not routed.accepted and time.monotonic() - started >= 1.5
    assert "did not answer schema id" in routes.letters.decode(routed.value).reason
    with pytest.raises(DecodeError, match="did not answer"):  # found down just now: no second wait per record
        started = time.monotonic()
        routes.codec.decode(b"\x00" + schema_id.to_bytes(4, "big") + b"\x02")
    assert time.monotonic() - started < 1.5
    with pytest.raises(RegistryError, match="did not answer"):  # a writer is told, not left to hang
        KafkaSchemaStore(gone).registered_id("x-value", load_schema("prompt"))
