"""A job with every role on its own simulated host (tests/netns.py), shared by tests/test_multihost.py and
bench/multihost.py: the broker on one, the trainer data-parallel over two (`torchrun --nnodes 2`, gloo),
two searchers and a filter on one each. Kafka clients log in with SASL/PLAIN (a user per role); weight
sync is TLS (a certificate for the trainer host's address) with a publish and a subscribe token.

Once the trainer steps and each searcher has received versions through gRPC, every process of one
searcher host is killed -9; the trainer must keep stepping and the other searcher keep producing and
receiving. The topics are then read back on the filter host: nothing a searcher logged as sent (its
batches are flushed, so acked, before it logs them) may be missing from raw, and curated plus the dlq
must account for raw.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from ops.metrics import metric_rows
from tests.netns import Hosts
from tests.tiny_models import saved_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ["kafka", "trainer-0", "trainer-1", "searcher-0", "searcher-1", "filter"]
KAFKA_PORT, SASL_PORT, WEIGHTS_PORT, RENDEZVOUS_PORT = 9092, 9093, 50051, 29500
RECEIVED = re.compile(r"searcher-\d: weight version (\d+) from (\S+), (\d+) bytes through gRPC")
MAPPED = re.compile(r"searcher-\d: weight version (\d+) from \S+, mapped from shared memory")
SENT = re.compile(r"searcher \d: (\d+) groups at policy version (\d+)")
STOPPED = re.compile(r"trainer stopped at step (\d+)")
START_BROKER = "import json, sys; from ops.broker import LocalBroker; LocalBroker(**json.loads(sys.argv[1])).start(150)"


class RoleDied(AssertionError):
    pass


def certificate(tmp: Path, address: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for the weight service at address."""
    cert, key = tmp / "weights.pem", tmp / "weights.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=trainer-0",
                    "-addext", f"subjectAltName=IP:{address}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


def job_yaml(tmp: Path, hosts: Hosts, model: str, cert: Path, key: Path) -> Path:
    trainer = hosts.address["trainer-0"]
    job = {
        "kafka": {"bootstrap": f"{hosts.address['kafka']}:{SASL_PORT}", "namespace": "multihost",
                  "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "client_timeout_s": 30},
        "topics": {"partitions": 2},
        "task": {"name": "toy", "train_size": 32, "eval_size": 2},
        "searcher": {"model": model, "searchers": 2, "samples_per_prompt": 4, "prompts_per_batch": 2,
                     "max_new_tokens": 6, "weights_target": f"{trainer}:{WEIGHTS_PORT}"},
        "buffer": {"samples_per_prompt": 4, "max_replay_ratio": 0},  # each role's recovery timed on its own
        "trainer": {"prompts_per_step": 2, "lora_r": 0, "lr": 1e-3, "warmup_steps": 1, "sync_every": 1,
                    "min_buffer_prompts": 2, "max_steps": 1_000_000, "eval_every": 1_000_000,
                    "checkpoint_every": 1_000_000, "eval_prompts": 2, "eval_max_new_tokens": 4,
                    "run_dir": str(tmp / "run-0")},
        "weights": {"host": trainer, "port": WEIGHTS_PORT, "tls_cert": str(cert), "tls_key": str(key),
                    "tls_ca": str(cert), "reconnect_max_s": 2.0},
    }  # fmt: skip
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def searcher_log(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    received = RECEIVED.findall(text)
    return {"versions": len(received), "newest": max((int(v) for v, _, _ in received), default=0),
            "wire_bytes": sum(int(b) for _, _, b in received), "targets": sorted({t for _, t, _ in received}),
            "shared_memory": len(MAPPED.findall(text)), "batches": len(SENT.findall(text)),
            "acked": sum(int(n) for n, _ in SENT.findall(text))}  # fmt: skip


def account(cfg_path: str, wait_s: float) -> dict:
    """On a host that reaches the broker: the groups of raw, and whether curated plus the dlq account for
    them (waiting up to wait_s for the filter to route all of raw)."""
    from ops.config import load_config
    from ops.topics import JobTopics

    topics = JobTopics(load_config(cfg_path))
    codec, letters = topics.raw.codec, topics.dlq.codec
    deadline = time.monotonic() + wait_s
    while True:
        groups = [codec.decode(r.value) for r in topics.raw.read()]
        curated = Counter(topics.curated.codec.decode(r.value).group_id for r in topics.curated.read())
        dlq = Counter(codec.decode(letters.decode(r.value).value).group_id for r in topics.dlq.read())
        routed = curated + dlq
        raw = Counter(g.group_id for g in groups)
        if not set(raw) - set(routed) or time.monotonic() > deadline:
            break
        time.sleep(1)
    return {
        "raw_by_searcher": dict(Counter(g.generator_id for g in groups)),
        "newest_version_by_searcher": {
            s: max(g.policy_version for g in groups if g.generator_id == s) for s in {g.generator_id for g in groups}
        },
        "raw_groups": len(raw),
        "duplicates_in_raw": sum(n - 1 for n in raw.values()),
        "curated": sum(curated.values()),
        "dlq": sum(dlq.values()),
        "routed_twice": sum(n - 1 for n in routed.values()),
        "not_routed": len(set(raw) - set(routed)),
        "routed_not_in_raw": len(set(routed) - set(raw)),
    }


def new_job(tmp: Path, hosts: Hosts, model: str) -> Job:
    """A Job on hosts with its config: weight sync served with a certificate for the trainer-0 host."""
    job = Job(tmp, hosts)
    cert, key = certificate(tmp, hosts.address["trainer-0"])
    job.config = job_yaml(tmp, hosts, model, cert, key)
    return job


class Job:
    """The roles' processes on their hosts, with their environments and logs."""

    def __init__(self, tmp: Path, hosts: Hosts):
        self.tmp, self.hosts = tmp, hosts
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.passwords = {user: secrets.token_hex(8) for user in ("admin", "trainer", "searcher", "filter")}
        self.tokens = {"publish": secrets.token_hex(16), "subscribe": secrets.token_hex(16)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.config = Path()

    def env(self, user: str | None = None, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.tmp), "PYTHONPATH": str(ROOT),
               "TBA_CACHE": os.environ.get("TBA_CACHE", str(ROOT / ".cache")), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "TBA_CONFIG": str(self.config)}  # fmt: skip
        if "JAVA_HOME" in os.environ:
            env["JAVA_HOME"] = os.environ["JAVA_HOME"]
        if user is not None:
            env.update(TBA__KAFKA__SASL_USERNAME=user, TBA_KAFKA_PASSWORD=self.passwords[user])
        return {**env, **extra}

    def start(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> None:
        self.procs[name] = self.hosts.popen(host, argv, env, self.logs / f"{name}.log")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self, *names: str) -> None:
        for name in names:
            if self.procs[name].poll() is not None:
                raise RoleDied(f"{name} exited ({self.procs[name].returncode}):\n{self.log(name)[-3000:]}")

    def start_broker(self) -> None:
        """The broker on the kafka host, then the job's topics (created from the filter host)."""
        broker = {"data_dir": str(self.tmp / "kafka"), "port": KAFKA_PORT, "host": self.hosts.address["kafka"],
                  "heap": "512m", "sasl_port": SASL_PORT, "sasl_users": self.passwords}  # fmt: skip
        done = self.hosts.run("kafka", python("-c", START_BROKER, json.dumps(broker)), self.env(), 180)
        assert done.returncode == 0, f"broker did not start: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        done = self.hosts.run("filter", python("-m", "tba.cli", "topics", "create"), self.env("admin"), 120)
        assert done.returncode == 0, f"topics create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    def trainer_env(self, rank: int) -> dict[str, str]:
        """The environment on trainer-{rank}: its tokens, and a run dir of its own (each host its own disk)."""
        return self.env("trainer", GLOO_SOCKET_IFNAME="eth0", TBA_WEIGHTS_PUBLISH_TOKEN=self.tokens["publish"],
                        TBA_WEIGHTS_SUBSCRIBE_TOKEN=self.tokens["subscribe"],
                        TBA__TRAINER__RUN_DIR=str(self.tmp / f"run-{rank}"))  # fmt: skip

    def start_searcher(self, i: int) -> None:
        env = self.env("searcher", TBA_WEIGHTS_SUBSCRIBE_TOKEN=self.tokens["subscribe"])
        self.start(f"searcher-{i}", f"searcher-{i}", python("-m", "tba.cli", "search", "--index", str(i)), env)

    def start_filter(self) -> None:
        self.start("filter", "filter", python("-m", "tba.cli", "filter", "--instance", "0"), self.env("filter"))

    def read_topics(self, host: str, wait_s: float) -> dict:
        """account() run on host (one that reaches the broker)."""
        argv = python("-m", "tests.multihost", str(self.config), str(wait_s))
        # reading every topic back from the start and decoding it takes minutes once raw holds tens of thousands
        # of groups on a busy machine: the bound is for a read that hangs, not a slow one
        done = self.hosts.run(host, argv, self.env("admin"), wait_s + 600)
        assert done.returncode == 0, f"reading the topics back failed: {done.stderr[-3000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def steps(self) -> int:
        return sum(r["kind"] == "train" for r in metric_rows(self.tmp / "run-0"))

    def searcher(self, i: int) -> dict:
        return searcher_log(self.logs / f"searcher-{i}.log")

    def stop(self, name: str, timeout_s: float) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RoleDied(f"{name} did not stop within {timeout_s}s:\n{self.log(name)[-3000:]}") from exc


def wait_until(job: Job, condition, timeout_s: float, what: str, alive: tuple[str, ...]) -> float:
    started = time.monotonic()
    while not condition():
        job.check_alive(*alive)
        if time.monotonic() - started > timeout_s:
            state = {"steps": job.steps(), "searcher-0": job.searcher(0), "searcher-1": job.searcher(1)}
            raise AssertionError(f"not within {timeout_s:.0f}s: {what}; {state}")
        time.sleep(0.5)
    return time.monotonic() - started


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_multihost(tmp: Path, min_steps: int = 10, min_versions: int = 2, timeout_s: float = 240) -> dict:
    started = time.monotonic()
    model = saved_tiny_llama(tmp / "model")
    with Hosts(HOSTS) as hosts:
        job = new_job(tmp, hosts, model)
        job.start_broker()
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        for rank in (0, 1):
            argv = [
                torchrun,
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                hosts.address["trainer-0"],
                "--master-port",
                str(RENDEZVOUS_PORT),
                "-m",
                "tba.cli",
                "train",
            ]
            job.start(f"trainer-{rank}", f"trainer-{rank}", argv, job.trainer_env(rank))
        for i in (0, 1):
            job.start_searcher(i)
        job.start_filter()
        roles = ("trainer-0", "trainer-1", "searcher-0", "searcher-1", "filter")

        def ready() -> bool:
            return job.steps() >= 3 and min(job.searcher(0)["versions"], job.searcher(1)["versions"]) >= min_versions

        wait_until(job, ready, timeout_s - (time.monotonic() - started), "3 steps and versions at both searchers",
                   roles)  # fmt: skip
        at_kill = {"steps": job.steps(), "searcher-0": job.searcher(0)}
        killed = hosts.kill("searcher-1")
        gone = job.searcher(1)  # what the killed searcher had logged: its acked groups and versions

        def kept_going() -> bool:
            now = job.searcher(0)
            before = at_kill["searcher-0"]
            stepped = job.steps() >= max(min_steps, at_kill["steps"] + 3)
            return stepped and now["acked"] > before["acked"] and now["versions"] > before["versions"]

        rest = ("trainer-0", "trainer-1", "searcher-0", "filter")
        wait_until(job, kept_going, max(60.0, timeout_s - (time.monotonic() - started)), "the rest kept going", rest)
        job.check_alive(*rest)
        searcher_exit = job.stop("searcher-0", 60)
        kept = job.searcher(0)
        topics = job.read_topics("filter", 60)
        job.check_alive("trainer-0", "trainer-1", "filter")
        job.stop("filter", 60)
        trainer_exits = [job.stop(f"trainer-{r}", 120) for r in (0, 1)]
        stopped_at = [STOPPED.findall(job.log(f"trainer-{r}")) for r in (0, 1)]
        steps = job.steps()
    searchers = {"searcher-0": kept, "searcher-1": gone}
    acked = {s: searchers[s]["acked"] for s in searchers}
    lost = sum(max(0, acked[s] - topics["raw_by_searcher"].get(s, 0)) for s in searchers)
    return {
        "hosts": len(HOSTS),
        "steps": steps,
        "versions_received_min": min(s["versions"] for s in searchers.values()),
        "lost": lost,
        "acked": acked,
        "searchers": searchers,
        "steps_at_kill": at_kill["steps"],
        "killed_pids": len(killed),
        "searcher_0_groups_after_kill": kept["acked"] - at_kill["searcher-0"]["acked"],
        "searcher_0_versions_after_kill": kept["versions"] - at_kill["searcher-0"]["versions"],
        "searcher_0_exit": searcher_exit,
        "trainer_exits": trainer_exits,
        "trainer_stopped_at": [int(s[-1]) if s else None for s in stopped_at],
        **topics,
        "wall_seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":  # `python -m tests.multihost CONFIG WAIT_S`: account() on a host that reaches Kafka
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(account(sys.argv[1], float(sys.argv[2]))))
