"""`tba run`: the whole job on one machine, supervised.

Starts the local broker (when kafka.bootstrap points at it) and the topics, then runs every role as its own
process: the trainer (which hosts the weight-sync service), searcher.searchers searchers (`tba scale searchers N`
changes how many while it runs: tba/elastic.py), run.filters filters and, with gateway.enabled, the
OpenAI-compatible gateway (`tba gateway`). A process that dies is restarted after a back-off that doubles per
crash; one that crashes more than run.max_restarts times stops the job. Ctrl-C, SIGTERM or the end of the wall
budget stop the trainer first (it checkpoints), then the others. Running again with the same trainer.run_dir
resumes: the trainer restores its checkpoint, filters continue from their committed offsets and searchers from
the newest policy version.

Everything a process says goes to run_dir/logs/<name>.log; the state of each process is written to
run_dir/job.json every tick, for the live view and for anyone watching from outside. One job at a time holds a
run dir (run_dir/.lock). A second Ctrl-C kills the processes instead of waiting for them. A broker the job
started itself is stopped with it, unless run.keep_broker (`tba run --keep-broker`); so is the local schema
registry, started after the broker when kafka.schema_registry_url names it (ops/registry.py). Every HEAL_EVERY_S
it looks for filter transactions left hanging by a broker's restart and ends them as their coordinator decided
(ops/transactions.py), which a person had to do by hand before.
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

from kafka.errors import KafkaError

from ops.broker import job_broker
from ops.config import ENV_PREFIX, TbaConfig, with_overrides
from ops.errors import BrokerError, TbaError
from ops.job import locked_run_dir, write_config
from ops.registry import job_registry
from ops.transactions import HangingTransactions
from tba.elastic import Scaler
from tba.live_view import scrape
from tba.logs import rotate
from tba.signals import Stop
from tba.stalls import StallWatch, filter_member_lag

log = logging.getLogger(__name__)
BROKER_RETRY_S = 5.0  # between tries at restarting a local broker that did not start
HEAL_EVERY_S = 15.0  # a look is a few admin requests; a hanging transaction is ended after its 60 s grace
LOOK_STUCK_S = 120.0  # a look is a few requests, each bounded by the client timeout: far longer is a hang


@dataclass
class RoleProcess:
    """One supervised process: its command line and what happened to it so far."""

    name: str
    role: str  # trainer | searcher | filter | gateway
    args: list[str]
    threads: int
    metrics_port: int | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0  # monotonic time of the next (re)start; 0: now
    exit_codes: list[int] = field(default_factory=list)
    stalls: int = 0  # restarts for making no progress while it had work (tba/stalls.py)
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
        return {"name": self.name, "role": self.role, "pid": self.proc.pid if self.running else None, "status": status,
                "restarts": self.restarts, "uptime_s": now - self.started_at if self.running else 0.0,
                "exit_codes": self.exit_codes[-5:], "stall_restarts": self.stalls,
                "metrics_port": self.metrics_port}  # fmt: skip


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the supervisor dies (even by kill -9), so no role outlives it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def role_processes(cfg: TbaConfig) -> list[RoleProcess]:
    """The trainer, the searchers, the filters and (gateway.enabled) the gateway, with metrics ports and a fair
    share of the cores. In sync mode the trainer generates its own on-policy batches (and writes them to raw as
    the job's history): there are no searchers.
    """
    searchers = cfg.searcher.searchers if cfg.trainer.mode == "async" else 0
    filters = cfg.run.filters
    gateways = int(cfg.gateway.enabled)
    # the trainer, each searcher and the gateway compute; filters barely do: they share what is left over
    threads = max(1, (os.cpu_count() or 1) // (1 + searchers + gateways))
    base = cfg.run.metrics_port
    port = (lambda i: base + i) if base else (lambda i: None)
    out = [RoleProcess("trainer", "trainer", ["train"], threads, port(0))]
    out += [searcher_process(i, threads, port(1 + i)) for i in range(searchers)]
    out += [
        RoleProcess(f"filter-{i}", "filter", ["filter", "--instance", str(i)], 1, port(1 + searchers + i))
        for i in range(filters)
    ]
    if gateways:  # on gateway.host:port, after the filters' metrics ports
        out.append(RoleProcess("gateway", "gateway", ["gateway"], threads, port(1 + searchers + filters)))
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
        self.stage = "preparing"  # preparing | running | stopping | stopped
        self.broker = None  # the local broker, when this job runs it
        self.started_broker = False  # it was not running before: the job stops it as it ends
        self.registry = None  # the local schema registry, when kafka.schema_registry_url names it
        self.started_registry = False
        self.broker_restarts = 0
        self.transactions = HangingTransactions(cfg)
        self.healing: threading.Thread | None = None
        self.next_heal = 0.0
        self.next_broker_start = 0.0  # monotonic time of the next try at restarting the broker
        self.scaler = Scaler(self, searcher_process)  # `tba scale searchers N` while it runs
        self.stalls = StallWatch(cfg.run.stall_s)

    # -- lifecycle ----------------------------------------------------------------------------------

    def prepare(self, progress=None, stop: threading.Event | None = None) -> bool:
        """Broker (if local), topics, the default model (once, before any process wants it) and the
        resolved config every process reads. progress(message) gives a context to wait in (a spinner).
        False when stop was set meanwhile: the rest is left undone (the broker's start is cut short too)."""
        from ops.topics import create_topics

        stop = stop or threading.Event()
        self.check_resume()
        progress = progress or (lambda message: contextlib.nullcontext())
        self.broker = job_broker(self.cfg)
        if self.broker is not None:
            self.started_broker = self.broker.status() is None
            with progress(f"starting the local Kafka broker on {self.broker.bootstrap} (jars resolved once)"):
                status = self.broker.start(stop=stop)
            if stop.is_set():
                return False
            log.info("broker at %s (pid %d, data in %s)", self.broker.bootstrap, status.pid, self.broker.data_dir)
        create_topics(self.cfg)
        self.registry = job_registry(self.cfg)
        if self.registry is not None and not stop.is_set():
            self.started_registry = self.registry.status() is None
            with progress(f"starting the local schema registry on {self.registry.url} (resolved once)"):
                self.registry.start()
        if not self.cfg.searcher.model or not self.cfg.trainer.model:
            from policy.default_model import default_model_dir

            if stop.is_set():
                return False
            with progress("preparing the default model (converted once)"):
                default_model_dir()
        self.logs.mkdir(parents=True, exist_ok=True)
        write_config(self.cfg)
        return not stop.is_set()

    def check_resume(self) -> None:
        """A run dir holding a checkpoint resumes only the job that wrote it (trainer/checkpoint.py's rule)."""
        from trainer.checkpoint import check_resume

        check_resume(self.cfg)

    def _launch(self, p: RoleProcess) -> None:
        verbose = ["--verbose"] if logging.getLogger().isEnabledFor(logging.DEBUG) else []  # as `tba run` was asked
        argv = [sys.executable, "-m", "tba.cli", *verbose, "--config", str(self.config_path), *p.args]
        if p.metrics_port:
            argv += ["--metrics-port", str(p.metrics_port)]
        # config.yaml already holds the TBA__ overrides, resolved (a free port for port 0): not again on top
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(OMP_NUM_THREADS=str(p.threads), PYTHONUNBUFFERED="1")
        with open(self.logs / f"{p.name}.log", "ab") as out:
            # own session: a Ctrl-C in the terminal reaches the supervisor alone, which stops in order; in this
            # process's working directory, where the config's relative paths (the default run_dir) are meant
            p.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)  # fmt: skip
        p.started_at = time.monotonic()
        self.stalls.started(p.name, p.started_at)
        log.info("started %s (pid %d)", p.name, p.proc.pid)

    def tick(self) -> bool:
        """Start what should run, notice exits, schedule restarts. False once the job is over."""
        now = time.monotonic()
        self.scaler.apply()
        if self.broker is not None and now >= self.next_broker_start and self.broker.status() is None:
            self.broker_restarts += 1  # the same data dir: nothing acked is lost
            log.warning("the local broker is gone; restarting it on %s", self.broker.data_dir)
            try:
                self.broker.start()
            except BrokerError as exc:  # e.g. its port held a moment by a client's socket: try again, not give up
                log.warning("the broker did not start (%s); trying again in %.0fs", exc, BROKER_RETRY_S)
                self.next_broker_start = now + BROKER_RETRY_S
        self._heal_transactions(now)
        for p in self.processes:  # role logs stay bounded, however long the job runs
            rotate(self.logs / f"{p.name}.log", int(self.cfg.run.log_max_mb * 1e6), self.cfg.run.log_backups)
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

    def _heal_transactions(self, now: float) -> None:
        """Every HEAL_EVERY_S, on a thread of its own (a look waits on Kafka, the tick must not): end
        hanging transactions, which would otherwise hold the filter group and every curated reader."""
        looking, failures = self.healing is not None and self.healing.is_alive(), self.transactions.failures
        if looking and now - (self.next_heal - HEAL_EVERY_S) > LOOK_STUCK_S and "stuck" not in failures:
            failures["stuck"] = f"a look for hanging transactions has not returned in {LOOK_STUCK_S:.0f}s"
            log.warning("%s: none is ended until it does", failures["stuck"])
        if looking or now < self.next_heal:
            return
        self.next_heal = now + HEAL_EVERY_S
        self.healing = threading.Thread(target=self._heal_once, name="heal-transactions", daemon=True)
        self.healing.start()

    def _heal_once(self) -> None:
        failures = self.transactions.failures
        failures.pop("stuck", None)
        try:
            self.transactions.heal()
            failures.pop("look", None)
        except Exception as exc:  # Kafka restarting or away: the next look tries again; anything else is a bug
            failures["look"] = repr(exc)
            expected = isinstance(exc, (KafkaError, TbaError, OSError))
            log.log(logging.DEBUG if expected else logging.ERROR, "could not look for hanging transactions: %r", exc)
        if self.cfg.run.stall_s:
            self._restart_stalled()

    def _restart_stalled(self) -> None:
        """Kill each running role that made no progress for run.stall_s while it had work: the tick restarts it."""
        watched = [(p, p.proc) for p in self.processes if p.running and p.metrics_port]  # this process, not a later one
        lag = {}
        if any(p.role == "filter" for p, _ in watched):
            try:
                lag = filter_member_lag(self.cfg)
            except (KafkaError, TbaError, OSError) as exc:  # unknown lag: no filter counts as stalled this look
                log.debug("could not read the filters' lag: %r", exc)
        for p, proc in watched:
            instance = p.args[-1] if p.role == "filter" else ""
            why = self.stalls.look(p.name, p.role, scrape(p.metrics_port, timeout_s=2.0), lag.get(instance))
            if why and proc.poll() is None and proc is p.proc:
                p.stalls += 1
                log.warning("restarting %s: %s (run.stall_s %.0f)", p.name, why, self.cfg.run.stall_s)
                proc.kill()

    def stop(self, hurry: threading.Event | None = None) -> None:
        """The trainer first (it checkpoints on SIGTERM), then searchers and filters; SIGKILL if they hang,
        or at once when hurry is set (a second Ctrl-C)."""
        self.stage = "stopping"
        self.write_state()
        self.terminate([self.trainer], self.cfg.run.stop_timeout_s, hurry)
        self.terminate(self.processes[1:], 30.0, hurry)
        self.stage = "stopped"
        self.write_state()

    def terminate(self, processes: list[RoleProcess], timeout_s: float, hurry: threading.Event | None = None) -> None:
        """SIGTERM these processes, wait up to timeout_s (or until hurry is set), then SIGKILL; none restarts."""
        hurry = hurry or threading.Event()
        for p in processes:  # one waiting out a restart back-off must not start after this either
            p.done = p.done or "stopped"
            if p.proc is not None and not p.running:  # it exited since the last tick: noted as a tick would
                p.exit_codes.append(p.proc.returncode)
                p.proc = None
        running = [(p, p.proc) for p in processes if p.running]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p, proc in running:
            while proc.poll() is None and time.monotonic() < deadline and not hurry.wait(0.1):
                pass
            if proc.poll() is None:
                why = "a second Ctrl-C" if hurry.is_set() else f"it did not stop within {timeout_s:.0f}s"
                log.warning("killing %s: %s", p.name, why)
                proc.kill()
                proc.wait()
            p.exit_codes.append(proc.returncode)
            p.proc = None

    def release_servers(self) -> None:
        """Stop the local registry and broker if this job started them, unless run.keep_broker; running ones stay."""
        for server, started, name in ((self.registry, self.started_registry, "registry"),
                                      (self.broker, self.started_broker, "kafka")):  # fmt: skip
            if server is None or not started:
                continue
            if self.cfg.run.keep_broker:
                log.info("the local %s this job started keeps running (run.keep_broker); `tba %s stop` stops it",
                         name, name)  # fmt: skip
                continue
            log.info("stopping the local %s this job started (--keep-broker keeps it)", name)
            server.stop()

    def state(self) -> dict:
        return {
            "namespace": self.cfg.kafka.namespace,
            "bootstrap": self.cfg.kafka.bootstrap,
            "elapsed_s": time.monotonic() - self.started,
            "budget_s": self.cfg.run.budget_s,
            "stage": self.stage,
            **({"failed": self.failed} if self.failed else {}),  # why it stopped, only when it failed
            "broker_restarts": self.broker_restarts,
            "hanging_transactions_healed": len(self.transactions.healed),
            "processes": [p.state() for p in self.processes],
        }

    def write_state(self) -> None:
        path = self.run_dir / "job.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(self.state(), indent=1))
        path.with_suffix(".tmp").replace(path)


def run_job(cfg: TbaConfig, stop: Stop, view=None, progress=None) -> dict:
    """`tba run`: prepare, supervise until stop / budget / max_steps / too many crashes, stop in order.

    view: called with the supervisor once a second (the live view); progress: see prepare().
    Returns the final job state.
    """
    with locked_run_dir(cfg.trainer.run_dir):
        supervisor = Supervisor(cfg)
        supervisor.write_state()  # this run's job.json from the start, never the previous run's
        prepared = False
        try:
            prepared = supervisor.prepare(progress, stop)
            supervisor.stage = "running" if prepared else supervisor.stage
            while prepared and supervisor.tick() and not stop.wait(1.0):
                if view is not None:
                    view(supervisor)
        except Exception as exc:  # job.json says why, not only the terminal
            supervisor.failed = supervisor.failed or (str(exc) if isinstance(exc, TbaError) else repr(exc))
            raise
        finally:
            log.info("stopping: trainer first (checkpoint), then searchers and filters; Ctrl-C again kills them")
            supervisor.stop(stop.hurry)
            if prepared:
                _snapshot_topics(supervisor.cfg, supervisor.run_dir / "inspect.json")
            supervisor.release_servers()
    if supervisor.failed:
        raise TbaError(f"the job stopped: {supervisor.failed}")
    return supervisor.state()


def _snapshot_topics(cfg: TbaConfig, path: Path) -> None:
    """What the topics hold as the job stops (`tba report` draws the dead letters from it)."""
    from tba.inspection import inspect_job

    try:
        path.write_text(json.dumps(inspect_job(cfg), indent=1))
    except Exception as exc:  # a report without topic figures is better than no clean stop
        log.warning("could not read the topics for %s: %s", path, exc)
