"""`tba run`: the whole job on one machine, supervised.

Starts the local broker (when kafka.bootstrap points at it) and the topics, then runs every role as
its own process: the trainer (which hosts the weight-sync service), searcher.searchers searchers
(`tba scale searchers N` changes how many while it runs: tba/elastic.py) and run.filters filters. A
process that dies is restarted after a back-off that doubles per crash; one that crashes more than
run.max_restarts times stops the job. Ctrl-C, SIGTERM or the end of the wall
budget stop the trainer first (it checkpoints), then the others. Running again with the same
trainer.run_dir resumes: the trainer restores its checkpoint, filters continue from their committed
offsets and searchers from the newest policy version.

Everything a process says goes to run_dir/logs/<name>.log; the state of each process is written to
run_dir/job.json every tick, for the live view and for anyone watching from outside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ops.broker import job_broker
from ops.config import ENV_PREFIX, TbaConfig, with_overrides
from ops.errors import TbaError
from ops.job import write_config
from tba.elastic import Scaler

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RoleProcess:
    """One supervised process: its command line and what happened to it so far."""

    name: str
    role: str  # trainer | searcher | filter
    args: list[str]
    threads: int
    metrics_port: int | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time of the next (re)start; 0: now
    exit_codes: list[int] = field(default_factory=list)
    done: str = ""  # why it is not to be started again: "finished" (the trainer at max_steps) or "stopped"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> dict:
        now = time.monotonic()
        if self.running:
            status = "running"
        elif self.done:
            status = self.done
        else:
            status = f"restarting in {max(0.0, self.next_start - now):.0f}s" if self.exit_codes else "starting"
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.proc.pid if self.running else None,
            "status": status,
            "restarts": self.restarts,
            "uptime_s": now - self.started_at if self.running else 0.0,
            "exit_codes": self.exit_codes[-5:],
            "metrics_port": self.metrics_port,
        }


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the supervisor dies (even by kill -9), so no role outlives it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def role_processes(cfg: TbaConfig) -> list[RoleProcess]:
    """The trainer, the searchers and the filters, with metrics ports and a fair share of the cores.

    In sync mode the trainer generates its own on-policy batches (and writes them to raw as the job's
    history): there are no searchers.
    """
    searchers = cfg.searcher.searchers if cfg.trainer.mode == "async" else 0
    filters = cfg.run.filters
    # the trainer and each searcher compute; filters barely do: they share what is left over
    threads = max(1, (os.cpu_count() or 1) // (1 + searchers))
    base = cfg.run.metrics_port
    port = (lambda i: base + i) if base else (lambda i: None)
    out = [RoleProcess("trainer", "trainer", ["train"], threads, port(0))]
    out += [searcher_process(i, threads, port(1 + i)) for i in range(searchers)]
    out += [
        RoleProcess(f"filter-{i}", "filter", ["filter", "--instance", str(i)], 1, port(1 + searchers + i))
        for i in range(filters)
    ]
    return out


def searcher_process(index: int, threads: int, metrics_port: int | None) -> RoleProcess:
    return RoleProcess(f"searcher-{index}", "searcher", ["search", "--index", str(index)], threads, metrics_port)


class Supervisor:
    def __init__(self, cfg: TbaConfig):
        from ops.broker import free_port
        from ops.job import for_job

        if cfg.weights.port == 0:  # searchers must know the port before the trainer binds it
            cfg = with_overrides(cfg, weights={"port": free_port()})
        cfg = for_job(cfg, create=True)  # this job's topics: its own, or those its run dir recorded
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.logs = self.run_dir / "logs"
        self.config_path = self.run_dir / "config.yaml"
        self.processes = role_processes(cfg)
        self.trainer = self.processes[0]
        self.started = time.monotonic()
        self.failed: str | None = None  # why the job stopped early, if it did
        self.broker = None  # the local broker, when this job runs it
        self.broker_restarts = 0
        self.scaler = Scaler(self, searcher_process)  # `tba scale searchers N` while it runs

    # -- lifecycle ----------------------------------------------------------------------------------

    def prepare(self, progress=None) -> None:
        """Broker (if local), topics, the default model (once, before any process wants it) and the
        resolved config every process reads. progress(message) gives a context to wait in (a spinner)."""
        from ops.topics import create_topics

        self.check_resume()
        progress = progress or (lambda message: contextlib.nullcontext())
        self.broker = job_broker(self.cfg)
        if self.broker is not None:
            with progress(f"starting the local Kafka broker on {self.broker.bootstrap} (jars resolved once)"):
                status = self.broker.start()
            log.info("broker at %s (pid %d, data in %s)", self.broker.bootstrap, status.pid, self.broker.data_dir)
        create_topics(self.cfg)
        if not self.cfg.searcher.model or not self.cfg.trainer.model:
            from policy.default_model import default_model_dir

            with progress("preparing the default model (converted once)"):
                default_model_dir()
        self.logs.mkdir(parents=True, exist_ok=True)
        write_config(self.cfg)

    def check_resume(self) -> None:
        """A run dir holding a checkpoint resumes only the job that wrote it (trainer/checkpoint.py's rule)."""
        from trainer.checkpoint import check_resume

        check_resume(self.cfg)

    def _launch(self, p: RoleProcess) -> None:
        argv = [sys.executable, "-m", "tba.cli", "--config", str(self.config_path), *p.args]
        if p.metrics_port:
            argv += ["--metrics-port", str(p.metrics_port)]
        # config.yaml already holds the TBA__ overrides, resolved (a free port for port 0): not again on top
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(OMP_NUM_THREADS=str(p.threads), PYTHONUNBUFFERED="1")
        with open(self.logs / f"{p.name}.log", "ab") as out:
            # own session: a Ctrl-C in the terminal reaches the supervisor alone, which stops in order
            p.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        p.started_at = time.monotonic()
        log.info("started %s (pid %d)", p.name, p.proc.pid)

    def tick(self) -> bool:
        """Start what should run, notice exits, schedule restarts. False once the job is over."""
        now = time.monotonic()
        self.scaler.apply()
        if self.broker is not None and self.broker.status() is None:  # same data dir: nothing acked is lost
            self.broker_restarts += 1
            log.warning("the local broker is gone; restarting it on %s", self.broker.data_dir)
            self.broker.start()
        for p in self.processes:
            if p.done or p.running:
                continue
            if p.proc is not None:  # it exited since the last tick
                code = p.proc.returncode
                p.proc = None
                p.exit_codes.append(code)
                if code == 0 and p is self.trainer:
                    p.done = "finished"
                    log.info("trainer finished (trainer.max_steps reached)")
                    return False
                if p.restarts >= self.cfg.run.max_restarts:
                    self.failed = f"{p.name} exited with status {code} after {p.restarts} restarts"
                    log.error("%s; stopping the job (see %s)", self.failed, self.logs / f"{p.name}.log")
                    return False
                delay = min(self.cfg.run.restart_max_s, self.cfg.run.restart_initial_s * 2**p.restarts)
                p.restarts += 1
                p.next_start = now + delay
                log.warning("%s exited with status %d; restart %d in %.0fs", p.name, code, p.restarts, delay)
            if now >= p.next_start:
                self._launch(p)
        self.write_state()
        budget = self.cfg.run.budget_s
        return not (budget and now - self.started >= budget)

    def stop(self) -> None:
        """The trainer first (it checkpoints on SIGTERM), then searchers and filters; SIGKILL if they hang."""
        self.terminate([self.trainer], self.cfg.run.stop_timeout_s)
        self.terminate(self.processes[1:], 30.0)
        self.write_state()

    def terminate(self, processes: list[RoleProcess], timeout_s: float) -> None:
        """SIGTERM these processes, wait up to timeout_s, then SIGKILL. They are not restarted."""
        for p in processes:  # one waiting out a restart back-off must not start after this either
            p.done = p.done or "stopped"
        running = [(p, p.proc) for p in processes if p.running]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p, proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", p.name, timeout_s)
                proc.kill()
                proc.wait()
            p.exit_codes.append(proc.returncode)

    def state(self) -> dict:
        return {
            "namespace": self.cfg.kafka.namespace,
            "bootstrap": self.cfg.kafka.bootstrap,
            "elapsed_s": time.monotonic() - self.started,
            "budget_s": self.cfg.run.budget_s,
            "failed": self.failed,
            "broker_restarts": self.broker_restarts,
            "processes": [p.state() for p in self.processes],
        }

    def write_state(self) -> None:
        path = self.run_dir / "job.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.state(), indent=1))
        path.with_suffix(".tmp").replace(path)


def run_job(cfg: TbaConfig, stop: threading.Event, view=None, progress=None) -> dict:
    """`tba run`: prepare, supervise until stop / budget / max_steps / too many crashes, stop in order.

    view: called with the supervisor once a second (the live view); progress: see prepare().
    Returns the final job state.
    """
    supervisor = Supervisor(cfg)
    supervisor.prepare(progress)
    try:
        while supervisor.tick() and not stop.wait(1.0):
            if view is not None:
                view(supervisor)
    finally:
        log.info("stopping: trainer first (checkpoint), then searchers and filters")
        supervisor.stop()
    state = supervisor.state()
    _snapshot_topics(cfg, supervisor.run_dir / "inspect.json")
    if supervisor.failed:
        raise TbaError(f"the job stopped: {supervisor.failed}")
    return state


def _snapshot_topics(cfg: TbaConfig, path: Path) -> None:
    """What the topics hold as the job stops (`tba report` draws the dead letters from it)."""
    from tba.inspection import inspect_job

    try:
        path.write_text(json.dumps(inspect_job(cfg), indent=1))
    except Exception as exc:  # a report without topic figures is better than no clean stop
        log.warning("could not read the topics for %s: %s", path, exc)
