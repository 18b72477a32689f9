"""The local schema registry: Confluent's REST API (Apicurio Registry) run as a process, its schemas kept in the
suite's Kafka so a restart loses nothing; started by `tba registry start` and by `tba run`."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid

import pytest

from ops.broker import free_port
from ops.config import with_overrides
from ops.errors import RegistryError
from ops.registry import LocalRegistry
from tba.supervisor import Supervisor
from tests.test_commands import tba
from tests.test_supervisor import local_job

SAMPLE_V1 = {"type": "record", "name": "Sample", "fields": [{"name": "prompt", "type": "string"}]}
# a new field with a default: readers of v2 still read what v1 wrote (BACKWARD compatible)
SAMPLE_V2 = {**SAMPLE_V1, "fields": [*SAMPLE_V1["fields"], {"name": "reward", "type": "double", "default": 0.0}]}
# a new field without one: v2 readers cannot read v1 records
SAMPLE_BROKEN = {**SAMPLE_V1, "fields": [*SAMPLE_V1["fields"], {"name": "reward", "type": "double"}]}


def call(url: str, body: dict | None = None) -> tuple[int, dict | list]:
    """One REST call as any HTTP client makes it (Confluent's content type)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_registers_fetches_checks_and_keeps_schemas_across_a_restart_by_the_cli(registry):
    subject = f"t{uuid.uuid4().hex[:8]}.curated-value"
    status, registered = call(f"{registry.url}/subjects/{subject}/versions", {"schema": json.dumps(SAMPLE_V1)})
    assert status == 200
    schema_id = registered["id"]
    assert call(f"{registry.url}/subjects/{subject}/versions", {"schema": json.dumps(SAMPLE_V1)})[1]["id"] == schema_id
    status, fetched = call(f"{registry.url}/schemas/ids/{schema_id}")
    assert status == 200 and json.loads(fetched["schema"]) == SAMPLE_V1

    config = registry.data_dir / "tba.yaml"  # `tba registry` on the registry of this data dir and port
    config.write_text(f"kafka:\n  bootstrap: {registry.bootstrap}\n"
                      f"registry:\n  port: {registry.port}\n  data_dir: {registry.data_dir}\n")  # fmt: skip
    env = {**os.environ, "TBA_CONFIG": str(config)}
    pid = registry.status().pid
    shown = tba("registry", "status", env=env)
    assert shown.returncode == 0 and f"pid {pid}" in shown.stdout and registry.url in shown.stdout
    assert tba("registry", "stop", env=env).stdout.strip() == "registry stopped"
    assert tba("registry", "status", env=env).returncode == 1
    started = tba("registry", "start", env=env, timeout=400)  # replays the journal topic: nothing lived in the process
    assert started.returncode == 0, started.stderr
    assert registry.status().pid != pid
    status, fetched = call(f"{registry.url}/schemas/ids/{schema_id}")
    assert status == 200 and json.loads(fetched["schema"]) == SAMPLE_V1
    status, latest = call(f"{registry.url}/subjects/{subject}/versions/latest")
    assert (status, latest["id"], latest["version"]) == (200, schema_id, 1)

    check = f"{registry.url}/compatibility/subjects/{subject}/versions/latest"
    assert call(check, {"schema": json.dumps(SAMPLE_V2)}) == (200, {"is_compatible": True})
    assert call(check, {"schema": json.dumps(SAMPLE_BROKEN)}) == (200, {"is_compatible": False})
    status, refused = call(f"{registry.url}/subjects/{subject}/versions", {"schema": json.dumps(SAMPLE_BROKEN)})
    assert status == 409, refused


def test_a_job_whose_schema_registry_url_names_the_local_registry_runs_it(registry, broker, tmp_path):
    job = local_job(tmp_path)
    cfg = with_overrides(job, kafka={"bootstrap": broker.bootstrap, "schema_registry_url": registry.url},
                         broker={"port": broker.port, "data_dir": str(broker.data_dir)},
                         registry={"port": registry.port, "data_dir": str(registry.data_dir)})  # fmt: skip
    supervisor = Supervisor(cfg)
    assert supervisor.prepare()
    assert supervisor.registry.status().pid == registry.status().pid and not supervisor.started_registry
    supervisor.release_servers()  # one running before the job stays
    assert registry.status() is not None
    elsewhere = with_overrides(cfg, kafka={"schema_registry_url": f"http://registry.example:{registry.port}"})
    other = Supervisor(elsewhere)
    assert other.prepare() and other.registry is None  # another host's registry: not the job's to start


def test_refuses_a_held_port_and_an_unreachable_kafka(broker, tmp_path):
    with pytest.raises(RegistryError, match=f"port {broker.port} on 127.0.0.1 is taken.*registry.port"):
        LocalRegistry(tmp_path / "a", broker.bootstrap, port=broker.port, port_setting="registry.port").start()
    with pytest.raises(RegistryError, match="Kafka at 127.0.0.1:.* is unreachable"):
        LocalRegistry(tmp_path / "b", f"127.0.0.1:{free_port()}", port=free_port()).start()
