"""Fault injection, shared by tests/test_faults.py and bench/faults.py: kill -9 the roles of a running
`tba run` job under a steady load of groups, and check from the topics that nothing acked was lost and
nothing was admitted twice."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ops import kafka_clients
from ops.broker import free_port, job_broker
from ops.config import TbaConfig, load_config
from ops.metrics import metric_rows
from ops.names import topic_names
from ops.topics import JobTopics, end_offsets
from ops.transactions import HangingTransactions
from producers.synthetic import synthetic_group
from tba.inspection import filter_lag
from tba.supervisor import HEAL_EVERY_S, Supervisor
from trainer.checkpoint import latest_checkpoint

ROLES = ["searcher-0", "filter-0", "filter-1", "trainer", "broker"]


def job_config(tmp: Path, model: str) -> TbaConfig:
    port = free_port()
    return load_config(
        environ={},
        kafka={"bootstrap": f"127.0.0.1:{port}", "namespace": "faults", "client_timeout_s": 15},
        broker={"port": port, "data_dir": str(tmp / "kafka"), "heap": "768m"},
        topics={"partitions": 2},
        task={"name": "toy", "train_size": 32, "eval_size": 4},
        searcher={"model": model, "samples_per_prompt": 4, "prompts_per_batch": 2, "max_new_tokens": 6},
        buffer={"samples_per_prompt": 4},
        trainer={"prompts_per_step": 2, "lora_r": 0, "lr": 1e-3, "warmup_steps": 1, "sync_every": 1,
                 "min_buffer_prompts": 2, "max_steps": 1_000_000, "eval_every": 1_000_000, "checkpoint_every": 20,
                 "eval_prompts": 4, "eval_max_new_tokens": 6, "run_dir": str(tmp / "run")},
        weights={"port": free_port(), "subscription_s": 10},
        run={"filters": 2, "metrics_port": 0, "restart_initial_s": 0.5, "restart_max_s": 4, "max_restarts": 1000},
    )  # fmt: skip


@contextmanager
def tiny_job(keep: str | None = None) -> Iterator[TbaConfig]:
    """job_config with a saved tiny model, in a temporary directory (or `keep`, to read its logs after);
    the job's broker is stopped on the way out."""
    from tests.tiny_models import saved_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        cfg = job_config(root, saved_tiny_llama(root / "model"))
        try:
            yield cfg
        finally:
            job_broker(cfg).stop()


class Load:
    """A steady stream of groups to raw from this process, remembering which ones were acked."""

    def __init__(self, cfg: TbaConfig, per_s: float, vocab: int):
        self.cfg, self.per_s, self.vocab = cfg, per_s, vocab
        self.acked: set[str] = set()
        self.failed = 0
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        raw = JobTopics(self.cfg).raw
        raw.codec  # noqa: B018 (made before the load starts: its schema registered once, outside the failures counted)
        producer = None
        while not self.stop.is_set():
            group = synthetic_group(rng, self.sent, samples=4, tokens=8, generator_id="load", vocab=self.vocab)
            self.sent += 1
            try:
                producer = producer or kafka_clients.producer(self.cfg, linger_ms=5)
                future = raw.produce(producer, group, key=group.prompt_id.encode())
                future.add_callback(lambda _, gid=group.group_id: self.acked.add(gid))
                future.add_errback(lambda _: self._fail())
                if self.sent % 20 == 0:
                    producer.flush(timeout=15)  # a producer stuck since the broker died is replaced, as roles are
            except Exception:  # not acked: allowed to be missing
                self._fail()
                if producer is not None:
                    try:
                        producer.close(timeout=0)  # abandons what it holds (not acked, so not counted)
                    except Exception:
                        pass
                producer = None
                time.sleep(1)
            time.sleep(1 / self.per_s)
        if producer is not None:
            producer.flush(timeout=60)
            producer.close()

    def _fail(self) -> None:
        self.failed += 1


def _latest_checkpoint(run_dir: Path) -> int:
    """The step of run_dir's newest checkpoint, 0 if none."""
    latest = latest_checkpoint(run_dir)
    return int(latest.name.split("-")[1]) if latest is not None else 0


def _starts(cfg: TbaConfig) -> list[tuple[float, int]]:
    """(time, step) of each trainer start: an eval at step 0 (nothing to resume) or a resume row."""
    rows = metric_rows(Path(cfg.trainer.run_dir))
    return [(r["time"], r["step"]) for r in rows if r["kind"] == "resume" or (r["kind"] == "eval" and r["step"] == 0)]


def _wait_dead(pid: int) -> None:
    """Until the process has stopped running (gone, or a zombie waiting to be reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists():
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return
        except (OSError, IndexError):
            return
        time.sleep(0.01)


def _batches_logged(run_dir: Path, name: str) -> int:
    """How many batches of at least one group the searcher's log (every run of it, appended) reports."""
    log = run_dir / "logs" / f"{name}.log"
    if not log.exists():
        return 0
    return len(re.findall(r": [1-9]\d* groups at policy version", log.read_text(errors="replace")))


def _pid(supervisor: Supervisor, role: str) -> int | None:
    if role == "broker":
        status = supervisor.broker.status()
        return status.pid if status else None
    process = next(p for p in supervisor.processes if p.name == role)
    return process.proc.pid if process.running else None


def run_faults(cfg: TbaConfig, kills: int, interval_s: float, seed: int = 0, load_per_s: float = 20) -> dict:
    rng = np.random.default_rng(seed)
    supervisor = Supervisor(cfg)
    supervisor.prepare()
    stop = threading.Event()

    def supervise() -> None:  # what run_job does, in a thread, so this one can kill
        while not stop.wait(0.5):
            supervisor.tick()

    ticker = threading.Thread(target=supervise)
    ticker.start()
    load = Load(cfg, load_per_s, vocab=128)
    load.thread.start()
    run_dir = Path(cfg.trainer.run_dir)
    killed, expected_resumes, searcher_kills, stalls = Counter(), [], [], []
    searched_before = 0  # batches the searcher had logged when last killed
    try:
        deadline = time.monotonic() + 240  # every role at work: the trainer has taken a step
        while not any(r["kind"] == "train" for r in metric_rows(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for i in range(kills):
            role = ROLES[i % len(ROLES)] if i < len(ROLES) else str(rng.choice(ROLES))
            pid = _pid(supervisor, role)
            if pid is None:  # still restarting from the last kill
                time.sleep(interval_s)
                continue
            if role.startswith("searcher"):
                searcher_kills.append(time.time())
                searched_before = _batches_logged(run_dir, role)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            killed[role] += 1
            if role == "trainer":  # it must come back at the last checkpoint it wrote before it died
                _wait_dead(pid)
                expected_resumes.append((killed_at, _latest_checkpoint(run_dir)))
            started = time.monotonic()
            while _pid(supervisor, role) in (None, pid) and time.monotonic() - started < 120:
                time.sleep(0.1)
            stalls.append(time.monotonic() - started)
            time.sleep(float(rng.uniform(0.5, 1.5)) * interval_s)
        load.stop.set()
        load.thread.join(120)
        searcher = next(p for p in supervisor.processes if p.role == "searcher")
        if searcher_kills:  # the restarted searcher must have published (it may have come back to no broker)
            deadline = time.monotonic() + 150
            while _batches_logged(run_dir, searcher.name) <= searched_before and time.monotonic() < deadline:
                time.sleep(1)
        supervisor.terminate([searcher], 60)  # no new groups: what raw holds can be drained
        deadline = time.monotonic() + 180  # the filters drain what is left
        while sum(lag := filter_lag(cfg).values()) and time.monotonic() < deadline:
            time.sleep(1)
        raw = topic_names(cfg).raw
        drained = end_offsets(cfg, [raw])[raw]  # nothing may write to raw after this (else unrouted by design)
        time.sleep(2 * interval_s)  # and the trainer ingests it
        # a transaction open when the broker died is aborted only once it times out, or, left hanging, ended once
        # the supervisor has seen it stuck for its grace (looking every HEAL_EVERY_S); until then it hides
        # every later committed record of its partitions from read_committed readers (the check's too); one
        # hanging on the filter group's __consumer_offsets partition alone hides no record, so ask for those too
        deadline = time.monotonic() + supervisor.transactions.grace_s + 3 * HEAL_EVERY_S
        while (open_transactions(cfg) or hanging_transactions_left(cfg)) and time.monotonic() < deadline:
            time.sleep(1)
        if expected_resumes:  # a trainer killed shortly before the broker may still be on its way back
            deadline = time.monotonic() + 120
            while _starts(cfg)[-1][0] < expected_resumes[-1][0] and time.monotonic() < deadline:
                time.sleep(1)
    finally:
        stop.set()
        ticker.join()
        supervisor.stop()
    return {"kills": dict(killed), "runs": sum(killed.values()), "max_stall_seconds": max(stalls, default=0.0),
            "filter_lag_at_end": sum(lag), "open_transactions_at_end": open_transactions(cfg),
            "hanging_transactions_healed": len(supervisor.transactions.healed),
            "hanging_transactions_left": [f"{t}: {_seen(supervisor, t)}" for t in hanging_transactions_left(cfg)],
            "load_sent": load.sent, "load_failed": load.failed, "load_still_sending": load.thread.is_alive(),
            "raw_written_after_drain": end_offsets(cfg, [raw])[raw] - drained,
            **check(cfg, load.acked, expected_resumes, searcher_kills)}  # fmt: skip


def _seen(supervisor: Supervisor, txn: str) -> str:
    """What the supervisor knew of a transaction left hanging: when it first saw it, why it could not end it."""
    seen = {str(t): time.monotonic() - at for t, at in supervisor.transactions.first_seen.items()}
    when = f"the supervisor first saw it {seen[txn]:.0f}s before" if txn in seen else "the supervisor never saw it"
    return f"{when}; its failures: {supervisor.transactions.failures}"


# Kafka (single node, kill -9 during a transaction's commit) can come back before it knows its own
# partitions' leaders, skip those partitions' commit markers as "likely deleted", and leave the
# transaction hanging there: read_committed readers and the filter group's offsets stop at it
SKIPPED_MARKERS = re.compile(r"Couldn't find leader endpoint for partitions Set\(([^)]*)\) while trying to send "
                             r"transaction markers for ([^,]+),")  # fmt: skip


def open_transactions(cfg: TbaConfig) -> int:
    """Records of curated and the dlq that read_committed readers cannot see yet."""
    names = topic_names(cfg)
    topics = [names.curated, names.dlq]
    return sum(end_offsets(cfg, topics, "read_uncommitted").values()) - sum(end_offsets(cfg, topics).values())


def hanging_transactions_left(cfg: TbaConfig) -> list[str]:
    """Open transactions no coordinator has (no grace: a live filter's transaction is its coordinator's)."""
    admin = kafka_clients.admin(cfg)
    try:
        return [str(t) for t in HangingTransactions(cfg, grace_s=0).find(admin)]
    finally:
        admin.close()


def hanging_transactions(cfg: TbaConfig) -> list[str]:
    """The transactions whose markers the broker skipped, from its log: 'transactional id: partitions'.
    The supervisor ends them as their coordinator decided (hanging_transactions_healed); none may be left."""
    log = Path(cfg.broker.data_dir) / "broker.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [f"{txn}: {parts}" for parts, txn in SKIPPED_MARKERS.findall(text)]


def check(cfg: TbaConfig, acked: set[str], expected_resumes: list, searcher_kills: list[float]) -> dict:
    """Read every topic from the start and the trainer's record, and count what went wrong."""
    topics = JobTopics(cfg)
    codec, letters = topics.raw.codec, topics.dlq.codec
    raw_records = topics.raw.read()
    groups = [codec.decode(r.value) for r in raw_records]
    raw = Counter(g.group_id for g in groups)
    curated = Counter(topics.curated.codec.decode(r.value).group_id for r in topics.curated.read())
    dlq = Counter(codec.decode(letters.decode(r.value).value).group_id for r in topics.dlq.read())
    routed = curated + dlq
    unrouted = [
        f"{r.partition}:{r.offset}" for r, g in zip(raw_records, groups, strict=True) if g.group_id not in routed
    ]
    rows = metric_rows(Path(cfg.trainer.run_dir))
    # a trainer start is an eval at step 0 (nothing to resume) or a resume row; after a kill -9 at time t
    # the next start must be at the checkpoint that was the latest at t (the trainer also restarts after
    # the broker's death, having checkpointed as it went: those starts are not checked here)
    starts = _starts(cfg)
    mismatches = 0
    for killed_at, expected in expected_resumes:
        after = next((step for t, step in starts if t > killed_at), None)
        mismatches += after != expected
    # a restarted searcher's first group must come from (nearly) the newest policy, not from version 0:
    # at least the version the trainer had published when the searcher was killed, less max_policy_lag
    published = [(r["time"], r["policy_version"]) for r in rows if r["kind"] == "train"]
    searched = sorted((g.created_at / 1000, g.policy_version) for g in groups if g.generator_id.startswith("searcher"))
    searcher_lags = []
    for killed_at in searcher_kills:
        newest = max((v for t, v in published if t <= killed_at), default=0)
        first = next((v for t, v in searched if t > killed_at), None)
        if first is not None:
            searcher_lags.append(max(0, newest - first))
    with np.load(latest_checkpoint(Path(cfg.trainer.run_dir)) / "buffer.npz", allow_pickle=True) as buffer:
        admitted = Counter(zip(buffer["partition"].tolist(), buffer["offset"].tolist(), strict=True))
    return {
        "acked": len(acked),
        "lost": len(acked - set(raw)),
        "raw_groups": len(raw),
        "duplicates_in_raw": sum(n - 1 for n in raw.values()),
        "duplicates_in_curated": sum(n - 1 for n in curated.values()),
        "routed_twice": sum(n - 1 for n in routed.values()),
        "not_routed": len(set(raw) - set(routed)),
        "not_routed_at": unrouted[:10],  # partition:offset in raw, to look them up
        "hanging_transactions": hanging_transactions(cfg),  # the broker's doing, see SKIPPED_MARKERS
        "trainer_restarts_checked": len(expected_resumes),
        "trainer_resume_mismatches": mismatches,
        "admitted_twice": sum(n - 1 for n in admitted.values()),
        "searcher_restarts_checked": len(searcher_lags),
        "searcher_resume_version_lag_max": max(searcher_lags, default=0),  # goal <= searcher.max_policy_lag
    }
