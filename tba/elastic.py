"""Elastic searchers: `tba prompts load`, `tba scale searchers N`, and the supervisor's side of scaling.

`tba scale searchers N` writes `<run_dir>/scale.json`; the running `tba run` supervisor reads it on
its next tick and starts searchers, or stops the newest ones with SIGTERM (each finishes its batch,
commits and leaves the searchers' group, whose partitions Kafka hands to the others). The count
lasts as long as that `tba run`: a new run of the job starts `searcher.searchers` again.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import click

log = logging.getLogger(__name__)
SCALE_FILE = "scale.json"
REMOVE_TIMEOUT_S = 60.0  # a removed searcher finishing a long batch; then it is killed (its prompts are redone)
RUNNING_WITHIN_S = 10.0  # job.json written this recently: its supervisor is alive (it writes every tick)


class Scaler:
    """Applies `tba scale searchers N` to a supervisor (tba/supervisor.py), from its tick."""

    def __init__(self, supervisor, searcher_process):
        self.supervisor = supervisor
        self.searcher_process = searcher_process  # (index, threads, metrics_port) -> a RoleProcess
        self.path = Path(supervisor.run_dir) / SCALE_FILE
        self.seen = self._mtime()  # a request an earlier run of this run dir left is not for this one
        self.removing: dict[str, float] = {}  # removed searchers not yet exited: name -> when to kill them

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def apply(self) -> None:
        self._reap()
        mtime = self._mtime()
        if mtime == self.seen:
            return
        self.seen = mtime
        try:
            wanted = int(json.loads(self.path.read_text())["searchers"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return
        processes = self.supervisor.processes
        active = [p for p in processes if p.role == "searcher" and not p.done]
        for p in active[wanted:]:  # the newest go first
            p.done = "removed"
            if p.running:
                p.proc.send_signal(signal.SIGTERM)
                self.removing[p.name] = time.monotonic() + REMOVE_TIMEOUT_S
            log.info("scale: removing %s", p.name)
        for _ in range(wanted - len(active)):
            p = self._new_searcher()
            processes.insert(max(i for i, q in enumerate(processes) if q.role in ("trainer", "searcher")) + 1, p)
            log.info("scale: adding %s", p.name)  # the supervisor starts it in this tick

    def _new_searcher(self):
        processes = self.supervisor.processes
        index = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in processes if p.role == "searcher"), default=-1)
        ports = [p.metrics_port for p in processes if p.metrics_port]  # a new one after every port in use
        return self.searcher_process(index, processes[0].threads, max(ports) + 1 if ports else None)

    def _reap(self) -> None:
        """Record the exit of removed searchers; kill one that outlived its timeout."""
        for p in self.supervisor.processes:
            if p.name not in self.removing:
                continue
            if not p.running:
                p.exit_codes.append(p.proc.returncode)
                p.proc = None  # noted once: a stop's terminate would note an exited process it finds
                del self.removing[p.name]
            elif time.monotonic() > self.removing[p.name]:
                log.warning("%s did not stop within %.0fs of its removal; killing it", p.name, REMOVE_TIMEOUT_S)
                p.proc.kill()


def running_job(run_dir: Path) -> dict:
    """The state of the job `tba run` is running in run_dir, or a ClickException saying why there is none."""
    path = run_dir / "job.json"
    try:
        age = time.time() - path.stat().st_mtime
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"no job is running in {run_dir} ({path}: {exc})") from exc
    if age > RUNNING_WITHIN_S:
        raise click.ClickException(f"no job is running in {run_dir}: its job.json was last written {age:.0f}s ago")
    return state


@click.group()
def scale() -> None:
    """Change a running `tba run` job."""


@scale.command("searchers")
@click.argument("count", type=click.IntRange(min=0))
@click.option("--job", "job_dir", default=None, type=click.Path(file_okay=False),
              help="The run dir of the job (default: trainer.run_dir).")  # fmt: skip
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for the job to get there.")
@click.pass_obj
def scale_searchers(obj, count: int, job_dir: str | None, timeout: float) -> None:
    """Run COUNT searchers in the running job: new ones join the searchers' group, removed ones leave it."""
    cfg = obj.cfg
    run_dir = Path(job_dir or cfg.trainer.run_dir)
    if cfg.trainer.mode == "sync":
        raise click.ClickException("trainer.mode is sync: the trainer generates, there are no searchers to scale")
    running_job(run_dir)
    if count > cfg.topics.partitions:
        click.echo(f"note: the prompts topic has {cfg.topics.partitions} partitions (topics.partitions): "
                   f"{count - cfg.topics.partitions} searcher(s) will idle until others leave", err=True)  # fmt: skip
    tmp = run_dir / f".{SCALE_FILE}.tmp"
    tmp.write_text(json.dumps({"searchers": count}))
    tmp.replace(run_dir / SCALE_FILE)
    deadline = time.monotonic() + timeout
    while True:
        procs = [p for p in running_job(run_dir)["processes"] if p["role"] == "searcher"]
        up = [p["name"] for p in procs if p["status"] == "running"]
        leaving = [p["name"] for p in procs if p["status"] == "removed" and p["pid"]]
        if (len(up) == count and not leaving) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    click.echo(f"{len(up)} searcher(s) running: {', '.join(up) or 'none'}"
               + (f"; still stopping: {', '.join(leaving)}" if leaving else ""))  # fmt: skip
    if len(up) != count or leaving:
        raise click.ClickException(f"the job did not reach {count} searchers within {timeout:.0f}s")


@click.group()
def prompts() -> None:
    """The job's prompts topic, which the searchers cycle through."""


@prompts.command("load")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def prompts_load(obj, path: str) -> None:
    """Append the prompts of a JSONL file ({"prompt"} or {"messages"}; "id", "answer" optional) to the job's topic.

    Loaded before the job's first searcher starts, they replace the task's training split."""
    from ops.topics import JobTopics, create_topics
    from policy.tasks.prompts import read_prompts
    from producers.prompt_feed import publish_prompts

    cfg = obj.job(create=True)
    create_topics(cfg)
    prompts = JobTopics(cfg).prompts
    count = publish_prompts(prompts, read_prompts(path, "tba prompts load"))
    click.echo(f"appended {count} prompt(s) to {prompts.name}")
