"""Network faults on a running job whose roles are each on a simulated host (tests/netns.py), shared by
tests/test_network_faults.py and bench/faults_network.py.

The job is tests/multihost.py's (SASL to Kafka, TLS and tokens on weight sync) with one trainer host:
the trainer data-parallel over two hosts would add a gloo link that a cut of trainer-0 severs too, and
that link, not Kafka nor weight sync, would then decide when the trainer comes back. One more host,
the observer, reads the committed ends of curated and the dlq twice a second: the filter's progress.

Each fault runs on the job as it steps: a host's cable pulled (its port on the bridge down), the weight
service cut off from one searcher (a blackhole route on the trainer's host), a host's link throttled,
the broker frozen (SIGSTOP). Once it is healed, recovery_s is the time to each role's first progress
(a batch of groups sent, a transaction committed, a trainer step, a weight version received). The fault
is then applied again and one role asked to stop (SIGTERM) meanwhile: stop_s is how long it took, against
the time the supervisor gives it (tba/supervisor.py). A role that exits by itself is started again, as
its supervisor would, and the case says so. Nothing a searcher logged as sent (acked) may be missing
from raw, and nothing may be in raw or routed twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path

from ops.metrics import metric_rows
from tests.multihost import RECEIVED, SENT, Job, new_job, python, wait_until
from tests.netns import Hosts
from tests.tiny_models import saved_tiny_llama

HOSTS = ["kafka", "trainer-0", "searcher-0", "searcher-1", "filter", "observer"]
ROLES = ["trainer-0", "searcher-0", "searcher-1", "filter"]
# progress of each role, and weight versions arriving at each searcher
PROGRESS = [*ROLES, "weights@searcher-0", "weights@searcher-1"]
# what the supervisor waits for a stopping role before SIGKILL: run.stop_timeout_s (the trainer), 30 s (the rest)
STOP_TIMEOUT_S = {"trainer-0": 120.0, "searcher-0": 30.0, "searcher-1": 30.0, "filter": 30.0}
RECOVERY_LIMIT_S = 30.0


@dataclass
class Fault:
    what: str  # said in the results
    stop_role: str  # the role asked to stop while the fault is on
    apply: Callable[[], None]
    undo: Callable[[], None]


def broker_pid(hosts: Hosts) -> int:
    """The broker's JVM on the kafka host."""
    for pid in hosts.pids("kafka"):
        try:
            if b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError("no broker process on the kafka host")


def faults(hosts: Hosts) -> dict[str, Fault]:
    """Every fault by name, on hosts."""

    def cut(host: str) -> Fault:
        what = f"{host}'s port on the bridge down (a pulled cable; the broker's host stays up)"
        return Fault(what, host, lambda: hosts.cut(host), lambda: hosts.heal(host))

    def signal_broker(sig: signal.Signals) -> Callable[[], None]:
        return lambda: os.kill(broker_pid(hosts), sig)

    return {
        "searcher_cut": cut("searcher-0"),
        "filter_cut": cut("filter"),
        "trainer_cut": cut("trainer-0"),
        "weights_cut": Fault(
            "blackhole route on trainer-0 to searcher-1: its weight link only (it keeps Kafka)",
            "searcher-1",
            lambda: hosts.blackhole("trainer-0", "searcher-1"),
            lambda: hosts.unblackhole("trainer-0", "searcher-1"),
        ),
        "searcher_throttled": Fault(
            "tbf 1mbit (burst 32kbit, latency 400ms) on searcher-0's eth0",
            "searcher-0",
            lambda: hosts.throttle("searcher-0"),
            lambda: hosts.unthrottle("searcher-0"),
        ),
        "broker_frozen": Fault(
            "the broker SIGSTOPped, then SIGCONT; the filter asked to stop meanwhile",
            "filter",
            signal_broker(signal.SIGSTOP),
            signal_broker(signal.SIGCONT),
        ),
    }


def _logged_at(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the roles' asctime, local time


def progress_times(job: Job, kind: str) -> list[float]:
    """When kind progressed: a searcher's batches sent, weight versions it received, the filter's commits (as
    the observer saw curated and the dlq grow), the trainer's steps."""
    if kind == "trainer-0":
        return [r["time"] for r in metric_rows(job.tmp / "run-0") if r["kind"] == "train"]
    if kind == "filter":
        rows = [json.loads(line) for line in job.log("observer").splitlines() if line.startswith("{")]
        return [row["t"] for before, row in pairwise(rows) if row["routed"] > before["routed"]]
    pattern = RECEIVED if kind.startswith("weights@") else SENT
    lines = job.log(kind.removeprefix("weights@")).splitlines()
    return [_logged_at(line[:23]) for line in lines if pattern.search(line)]


def start_role(job: Job, role: str) -> None:
    if role == "trainer-0":
        job.start(role, role, python("-m", "tba.cli", "train"), job.trainer_env(0))
    elif role == "filter":
        job.start_filter()
    else:
        job.start_searcher(int(role.removeprefix("searcher-")))


def restart_exited(job: Job, exits: list[dict]) -> None:
    """Start again a role that exited by itself (as its supervisor would), noting when and how it ended."""
    for role in ROLES:
        code = job.procs[role].poll()
        if code is not None:
            exits.append({"role": role, "exit": code, "at": time.time(), "log": job.log(role)[-1500:]})
            start_role(job, role)


def wait_progress(job: Job, kinds: list[str], since: float, timeout_s: float, exits: list[dict]) -> dict:
    """Seconds from `since` to each kind's first progress after it (None: not within timeout_s)."""
    first: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(first) < len(kinds) and time.monotonic() < deadline:
        restart_exited(job, exits)
        for kind in set(kinds) - set(first):
            after = [t for t in progress_times(job, kind) if t > since]
            if after:
                first[kind] = round(min(after) - since, 1)
        time.sleep(0.5)
    return {kind: first.get(kind) for kind in kinds}


def hold(job: Job, seconds: float, exits: list[dict]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        restart_exited(job, exits)
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def stop_during(job: Job, fault: Fault, after_s: float, exits: list[dict]) -> dict:
    """Apply fault again, SIGTERM its stop_role after after_s, time the exit; then heal and start the role again."""
    role, limit = fault.stop_role, STOP_TIMEOUT_S[fault.stop_role]
    fault.apply()
    try:
        hold(job, after_s, exits)
        proc = job.procs[role]
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=limit + 30)  # past the limit too: how far past, not just that it was
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        stop_s = time.monotonic() - asked
    finally:
        fault.undo()
    started = time.time()
    start_role(job, role)
    back = wait_progress(job, [role], started, 240, exits)[role]
    return {"role": role, "stop_s": round(stop_s, 1), "limit_s": limit, "exit": code, "back_after_start_s": back,
            "log_tail": job.log(role)[-800:] if stop_s > limit else ""}  # fmt: skip


def run_case(job: Job, fault: Fault, fault_s: float, stop_after_s: float) -> dict:
    exits: list[dict] = []
    began = applied = time.monotonic()
    fault.apply()
    try:
        hold(job, fault_s, exits)
    finally:
        fault.undo()
    healed, lasted = time.time(), time.monotonic() - applied
    recovery = wait_progress(job, PROGRESS, healed, 3 * RECOVERY_LIMIT_S, exits)
    stop = stop_during(job, fault, stop_after_s, exits)
    return {"fault": fault.what, "fault_s": round(lasted, 1), "recovery_s": recovery, "stop": stop,
            "stop_s": stop["stop_s"], "exited_by_themselves": exits,
            "case_wall_s": round(time.monotonic() - began, 1)}  # fmt: skip


def tally(job: Job, wait_s: float) -> dict:
    """lost and duplicated so far: what the searchers had logged as sent (read first: all of it is in raw
    by the time raw is read) against raw, and raw against curated + the dlq."""
    acked = {f"searcher-{i}": job.searcher(i)["acked"] for i in (0, 1)}
    topics = job.read_topics("observer", wait_s)
    lost = sum(max(0, n - topics["raw_by_searcher"].get(s, 0)) for s, n in acked.items())
    return {"acked": acked, "lost": lost, "duplicated": topics["duplicates_in_raw"] + topics["routed_twice"], **topics}


def steady(job: Job) -> bool:
    return all(progress_times(job, kind) for kind in PROGRESS) and job.steps() >= 3


def run_network_faults(tmp: Path, cases: list[str], fault_s: float, stop_after_s: float = 8.0,
                       each_tally: bool = True, timeout_s: float = 600) -> dict:  # fmt: skip
    """The job, steady, then each case in turn on it; lost/duplicated per case (each_tally) and at the end."""
    started = time.monotonic()
    model = saved_tiny_llama(tmp / "model")
    with Hosts(HOSTS) as hosts:
        job = new_job(tmp, hosts, model)
        job.start_broker()
        for role in ROLES:
            start_role(job, role)
        job.start("observer", "observer", python("-m", "tests.network_faults", str(job.config)), job.env("admin"))
        wait_until(job, lambda: steady(job), timeout_s, "every role progressing", (*ROLES, "observer"))
        results, before = {}, tally(job, 30) if each_tally else None
        for name in cases:
            results[name] = run_case(job, faults(hosts)[name], fault_s, stop_after_s)
            if each_tally:
                now = tally(job, 30)
                results[name].update(lost=now["lost"] - before["lost"],
                                     duplicated=now["duplicated"] - before["duplicated"])  # fmt: skip
                before = now
        for i in (0, 1):  # no more groups: raw is complete, and all of it routed before the end
            job.stop(f"searcher-{i}", STOP_TIMEOUT_S[f"searcher-{i}"] + 30)
        final = tally(job, 120)
        steps = job.steps()
    return {"hosts": len(HOSTS), "trainer": "one host (see tests/network_faults.py)", "fault_s": fault_s,
            "recovery_limit_s": RECOVERY_LIMIT_S, "cases": results, "steps": steps, "final": final,
            "wall_seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def observe(cfg_path: str) -> None:
    """On the observer host: a line {"t": time, "routed": records} each time the committed ends of curated and
    the dlq (transaction markers included: each commit moves them) change."""
    from kafka import TopicPartition

    from ops import kafka_clients
    from ops.config import load_config
    from ops.names import topic_names

    cfg = load_config(cfg_path)
    names = topic_names(cfg)
    consumer, last = None, None
    while True:
        try:
            consumer = consumer or kafka_clients.consumer(cfg)  # read_committed: ends move at commits
            parts = [TopicPartition(t, p) for t in (names.curated, names.dlq) for p in consumer.partitions_for_topic(t)]
            routed = sum(consumer.end_offsets(parts).values())
        except Exception as exc:  # the broker frozen or away: say so, and ask again
            print(f"no answer: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(1)
            continue
        if routed != last:
            print(json.dumps({"t": time.time(), "routed": routed}), flush=True)
            last = routed
        time.sleep(0.5)


if __name__ == "__main__":  # `python -m tests.network_faults CONFIG`: observe() on a host that reaches Kafka
    observe(sys.argv[1])
