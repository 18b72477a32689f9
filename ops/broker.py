"""A real Apache Kafka broker (KRaft, broker+controller) run as a local process, and N of them as a cluster.

The classpath is resolved once from Maven Central with ops/kafka/pom.xml into a git-ignored cache.
Each node keeps everything in its data dir: server.properties, the log segments, broker.log and
node.json (pid and ports), so `start` twice is one broker and a restart reuses the same data.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ops.errors import BrokerError

log = logging.getLogger(__name__)
KAFKA_VERSION = "4.3.1"
ROOT = Path(__file__).resolve().parents[1]
POM = Path(__file__).with_name("kafka") / "pom.xml"
LOG4J = Path(__file__).with_name("kafka") / "log4j2.properties"
AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"  # KRaft's, ACLs in the metadata log


def cache_dir() -> Path:
    return Path(os.environ.get("TBA_CACHE", ROOT / ".cache"))


def classpath() -> str:
    """The broker's jars (resolved with Maven on first use), as a java -cp argument."""
    libs = cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"
    done = libs / ".resolved"
    if not done.exists():
        if shutil.which("mvn") is None:
            raise BrokerError(
                "Maven (mvn) is needed once to resolve the Kafka jars; install it (apt-get install maven)"
            )
        print(f"resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central into {libs} (once)", flush=True)
        cmd = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerError(f"resolving Kafka jars failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        done.write_text(KAFKA_VERSION)
    return str(libs / "*")


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a client reconnecting to a server on an ephemeral port
    while it is down can be given that very port as its own and connect to itself (TCP's simultaneous open),
    and the server's restart then finds its port taken."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = range(10_000, low)
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port between 10000 and {low}")


def check_port_free(host: str, port: int, what: str, port_setting: str, error: type[Exception]) -> None:
    """Fail at once when another program listens on the port: a Java server would only fail after its long start."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            move = f": free it, or move the {what} with {port_setting}" if port_setting else ""
            raise error(f"port {port} on {host} is taken by another program ({exc.strerror}){move}") from exc


def first_error(log_file: Path, start: int, marker: str) -> str:
    """The first line holding marker that a start wrote to log_file (from byte start), with the exception line under
    it: the cause, where the last lines are the consequences. Its last lines when there is none."""
    if not log_file.exists():
        return ""
    with open(log_file, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            cause = lines[i + 1] if i + 1 < len(lines) and lines[i + 1][:1] != line[:1] else ""
            return "\n".join(filter(None, (line, cause)))
    return "\n".join(lines[-20:])


def process_alive(pid: int, marker: bytes = b"kafka.Kafka") -> bool:
    """Whether pid runs, and is still the Java program whose command line holds marker (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    return marker in cmdline and state != "Z"


@dataclass(frozen=True)
class BrokerStatus:
    node_id: int
    pid: int
    port: int
    controller_port: int
    data_dir: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalBroker:
    """One KRaft node (broker + controller) listening on host:port (127.0.0.1 unless told otherwise)."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int = 9092,
        node_id: int = 1,
        heap: str = "1g",
        sasl_port: int | None = None,
        sasl_users: dict[str, str] | None = None,
        super_users: tuple[str, ...] = (),
        port_setting: str = "",
        host: str = "127.0.0.1",
    ):
        self.host = host  # every listener's address, and the one advertised to clients
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.port_setting = port_setting  # how a user moves the port, for the error when it is taken
        self.node_id = node_id
        self.heap = heap
        # an extra SASL_PLAINTEXT listener (mechanism PLAIN) for these users -> passwords; the
        # PLAINTEXT listener stays for the brokers themselves
        self.sasl_port = sasl_port
        self.sasl_users = sasl_users or {}
        self.super_users = super_users  # given: the authorizer enforces ACLs, these SASL users bypass them
        self._state = self.data_dir / "node.json"
        self._log_start = 0  # where this start's lines begin in broker.log (it keeps every start's)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def status(self) -> BrokerStatus | None:
        """The running node of this data dir, or None."""
        if not self._state.exists():
            return None
        state = json.loads(self._state.read_text())
        if not process_alive(state["pid"]):
            return None
        return BrokerStatus(state["node_id"], state["pid"], state["port"], state["controller_port"], self.data_dir)

    def configure(self, voters: dict[int, int], cluster_id: str, cluster_size: int = 1) -> None:
        """Write server.properties and format storage, once per data dir. voters: node_id -> controller port."""
        props = self.data_dir / "server.properties"
        if props.exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        replicas = min(3, cluster_size)
        host = self.host
        lines = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "listeners": f"PLAINTEXT://{host}:{self.port},CONTROLLER://{host}:{voters[self.node_id]}",
            "advertised.listeners": f"PLAINTEXT://{host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.quorum.voters": ",".join(f"{n}@{host}:{p}" for n, p in sorted(voters.items())),
            "log.dirs": self.data_dir / "data",
            "num.partitions": 4,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min(2, replicas),
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min(2, replicas),
            "group.initial.rebalance.delay.ms": 0,
            "message.max.bytes": 16 * 1024 * 1024,
            "replica.fetch.max.bytes": 16 * 1024 * 1024,
            "auto.create.topics.enable": "false",
            # Small segments for the many test topics: keep the disk footprint small.
            "log.segment.bytes": 64 * 1024 * 1024,
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": 10_000,
        }
        if self.sasl_port:
            users = " ".join(f"user_{name}={jaas_quoted(password)}" for name, password in self.sasl_users.items())
            sasl = f"SASL_PLAINTEXT://{host}:{self.sasl_port}"
            lines.update({
                # CONTROLLER stays last: launch() reads the controller port from the end of this line
                "listeners": f"PLAINTEXT://{host}:{self.port},{sasl},CONTROLLER://{host}:{voters[self.node_id]}",
                "advertised.listeners": f"{lines['advertised.listeners']},{sasl}",
                "listener.security.protocol.map":
                    "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
                "sasl.enabled.mechanisms": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
            })  # fmt: skip
        if self.super_users:  # the broker's own PLAINTEXT and CONTROLLER listeners connect as User:ANONYMOUS
            supers = ";".join(f"User:{name}" for name in ("ANONYMOUS", *self.super_users))
            lines.update({"authorizer.class.name": AUTHORIZER, "super.users": supers})
        tmp = props.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}={properties_value(v)}\n" for k, v in lines.items()))
        tmp.chmod(0o600)  # it may hold SASL passwords
        proc = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(tmp), "--ignore-formatted"),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise BrokerError(f"formatting KRaft storage in {self.data_dir} failed: {proc.stdout}{proc.stderr}")
        tmp.rename(props)

    def _java(self, main: str, *args: str, server: bool = False) -> list[str]:
        jvm = [f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
        if server:  # the whole heap held from the start, as Kafka's ops guide advises: memory flat for weeks, not
            jvm += [f"-Xms{self.heap}", "-XX:+AlwaysPreTouch"]  # growing until the heap has once been filled
        return ["java", *jvm, f"-Dlog4j2.configurationFile={LOG4J}", "-cp", classpath(), main, *args]

    def launch(self) -> int:
        """Start the node process (server.properties must exist); returns its pid. Does not wait."""
        running = self.status()
        if running:
            return running.pid
        props = self.data_dir / "server.properties"
        controller_port = int(
            next(line for line in props.read_text().splitlines() if line.startswith("listeners=")).rsplit(":", 1)[1]
        )
        with open(self.log_file, "ab") as out:
            self._log_start = out.tell()
            proc = subprocess.Popen(
                self._java("kafka.Kafka", str(props), server=True),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.data_dir,
            )
        deadline = time.monotonic() + 10
        while not process_alive(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until exec has replaced the forked Python (status() checks the cmdline)
        state = {"pid": proc.pid, "port": self.port, "controller_port": controller_port, "node_id": self.node_id}
        tmp = self._state.with_suffix(".tmp")  # whole or absent: status() in another thread reads it meanwhile
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state)
        return proc.pid

    def start(self, timeout_s: float = 90, stop: threading.Event | None = None) -> BrokerStatus:
        """Format (first time), start and wait until metadata answers (or stop is set). Idempotent."""
        running = self.status()
        if running:
            return running
        check_port_free(self.host, self.port, "broker", self.port_setting, BrokerError)
        if not (self.data_dir / "server.properties").exists():
            self.configure({self.node_id: free_port()}, _cluster_id())
        self.launch()
        wait_ready([self], timeout_s, stop)
        return self.status()

    def first_error(self) -> str:
        return first_error(self.log_file, self._log_start, "] ERROR ")

    def stop(self, timeout_s: float = 30) -> bool:
        """SIGTERM (controlled shutdown), SIGKILL after timeout_s. True if a node was stopped."""
        pid = self.terminate()
        if pid is None:
            return False
        wait_gone(pid, timeout_s)
        return True

    def terminate(self) -> int | None:
        """Send SIGTERM without waiting; returns the pid, or None if not running."""
        running = self.status()
        if not running:
            return None
        os.kill(running.pid, signal.SIGTERM)
        return running.pid

    def kill(self) -> None:
        """kill -9, as a crash would."""
        running = self.status()
        if running:
            os.kill(running.pid, signal.SIGKILL)
            _reap(running.pid)


def wait_gone(pid: int, timeout_s: float, marker: bytes = b"kafka.Kafka") -> None:
    """Wait up to timeout_s for a SIGTERMed process to exit, then SIGKILL it."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
    _reap(pid, marker)


def _reap(pid: int, marker: bytes = b"kafka.Kafka") -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # started by another process: wait until it is gone
        while process_alive(pid, marker):
            time.sleep(0.05)


def _cluster_id() -> str:
    proc = subprocess.run(
        ["java", "-cp", classpath(), "kafka.tools.StorageTool", "random-uuid"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        # Any 16 random bytes, base64url without padding, is a valid cluster id.
        import base64

        return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return proc.stdout.strip()


def wait_ready(nodes: list[LocalBroker], timeout_s: float, stop: threading.Event | None = None) -> None:
    """Poll cluster metadata until every node is registered (or stop is set); fail early if a process dies."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    bootstrap = [n.bootstrap for n in nodes]
    log.info("waiting for Kafka at %s to start (up to %.0fs; its log: %s)", ",".join(bootstrap), timeout_s,
             ", ".join(str(n.log_file) for n in nodes))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return
        for node in nodes:
            if node.status() is None:
                raise BrokerError(
                    f"Kafka node {node.node_id} exited during start; its first error ({node.log_file}):\n"
                    f"{node.first_error()}"
                )
        try:  # a short bootstrap wait: a node that dies meanwhile is seen within seconds
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000, bootstrap_timeout_ms=3000)
            try:
                brokers = admin.describe_cluster()["brokers"]
            finally:
                admin.close()
            if len(brokers) >= len(nodes):
                return
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise BrokerError(f"Kafka at {','.join(bootstrap)} did not answer metadata within {timeout_s:.0f}s ({last})")


def properties_value(value) -> str:
    """value as a .properties file reads it back: a backslash there escapes the next character, so it is doubled."""
    return str(value).replace("\\", "\\\\")


def jaas_quoted(value: str) -> str:
    """A JAAS option value in double quotes: a password may hold a quote or a backslash."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def configured_broker(cfg) -> LocalBroker:
    """The local broker that cfg.broker describes (`tba kafka start|stop|status`)."""
    from ops.config import ENV_PREFIX

    move = f"broker.port (environment {ENV_PREFIX}BROKER__PORT), and kafka.bootstrap to the same port"
    return LocalBroker(cfg.broker.data_dir, cfg.broker.port, heap=cfg.broker.heap, port_setting=move)


def job_broker(cfg) -> LocalBroker | None:
    """The local broker a job runs itself: the configured one when kafka.bootstrap names it, else None
    (kafka.bootstrap points at another cluster)."""
    host, _, port = cfg.kafka.bootstrap.rpartition(":")
    if host in ("127.0.0.1", "localhost") and port == str(cfg.broker.port):
        return configured_broker(cfg)
    return None
