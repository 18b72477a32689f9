"""Elastic searchers under a running job: add a searcher (`tba scale searchers 3`), kill one with
kill -9 (the supervisor restarts it), remove one cleanly (`tba scale searchers 2`), and check from
the topics that every prompt kept being served and nothing acked was lost.

    python bench/elastic.py [--phase-timeout-s 180]  ->  bench/results/elastic.json

The job runs on a broker of its own with a tiny random model and the toy task (tests/fault_injection.py's
job), two searchers to start with and a prompts topic of 4 partitions. After each change a phase
lasts until every prompt has reached raw again (or the timeout): prompts_never_served counts the
prompts some phase never served. max_stall_s is the longest time, from the first group to the stop,
in which no group reached raw. lost compares the groups each searcher's log says were acked (it logs
a batch after the flush that confirms it) with the groups of that searcher in raw.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from ops.config import TbaConfig, with_overrides  # noqa: E402
from ops.topics import JobTopics, Topic  # noqa: E402
from tba.supervisor import Supervisor  # noqa: E402
from tests.fault_injection import tiny_job  # noqa: E402

ACKED_LINE = re.compile(r"searcher \d+: (\d+) groups at policy version")


class RawWatch:
    """Tails raw from the beginning in a thread: when each prompt reached it, from which searcher."""

    def __init__(self, raw: Topic):
        self.raw = raw
        self.served: list[tuple[float, str, str]] = []  # (record time, prompt id, generator id)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        codec = self.raw.codec
        consumer = self.raw.consumer()
        consumer.assign(self.raw.partitions_in(consumer))
        while not self.stop.is_set():
            for records in consumer.poll(timeout_ms=500).values():
                groups = [(r.timestamp / 1000, codec.decode(r.value)) for r in records]
                self.served += [(at, g.prompt_id, g.generator_id) for at, g in groups]
        consumer.close()

    def served_since(self, t: float) -> set[str]:
        return {prompt for at, prompt, _ in self.served if at >= t}

    def searchers_since(self, t: float) -> set[str]:
        return {generator for at, _, generator in self.served if at >= t}


def scale(cfg: TbaConfig, count: int) -> None:
    config = Path(cfg.trainer.run_dir) / "config.yaml"
    cmd = [sys.executable, "-m", "tba.cli", "--config", str(config), "scale", "searchers", str(count)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    print(done.stdout.strip(), done.stderr.strip(), flush=True)
    if done.returncode:
        raise RuntimeError(f"tba scale searchers {count} failed: {done.stderr}")


def run_elastic(cfg: TbaConfig, phase_timeout_s: float) -> dict:
    supervisor = Supervisor(cfg)
    supervisor.prepare()
    stop = threading.Event()

    def supervise() -> None:  # what run_job does, in a thread, so this one can scale and kill
        while not stop.wait(0.5):
            supervisor.tick()

    ticker = threading.Thread(target=supervise)
    ticker.start()
    topics = JobTopics(cfg)
    watch = RawWatch(topics.raw)
    phases: dict[str, dict] = {}
    prompts: set[str] = set()

    def phase(name: str, joining: str | None = None) -> None:
        """Until every prompt reached raw after this moment (the group served them all again) and the
        joining searcher, if any, served too (it has loaded its model and taken partitions)."""
        start = time.time()
        while time.time() - start < phase_timeout_s:
            prompts.update(topics.prompts.codec.decode(r.value)["prompt_id"] for r in topics.prompts.read())
            if prompts and prompts <= watch.served_since(start) and joining in {None, *watch.searchers_since(start)}:
                break
            time.sleep(1)
        unserved = prompts - watch.served_since(start)
        phases[name] = {"all_served_after_s": round(time.time() - start, 1), "unserved": sorted(unserved),
                        "searchers_serving": sorted(watch.searchers_since(start))}  # fmt: skip
        print(name, phases[name], flush=True)

    try:
        phase("started")  # two searchers, from the job's start
        scale(cfg, 3)
        phase("added", joining="searcher-2")
        victim = next(p for p in supervisor.processes if p.role == "searcher" and p.running)
        os.kill(victim.proc.pid, signal.SIGKILL)
        phase("killed")
        scale(cfg, 2)
        phase("removed")
    finally:
        stopped_at = time.time()
        stop.set()
        ticker.join()
        supervisor.stop()
        watch.stop.set()
    records = topics.raw.read()
    in_raw = Counter(topics.raw.codec.decode(r.value).generator_id for r in records)
    times = sorted(t for t in (r.timestamp / 1000 for r in records) if t <= stopped_at)  # not the stop itself
    logs = Path(cfg.trainer.run_dir) / "logs"
    acked = {
        log.stem: sum(int(n) for n in ACKED_LINE.findall(log.read_text(errors="replace")))
        for log in logs.glob("searcher-*.log")
    }
    searchers = [p for p in supervisor.processes if p.role == "searcher"]
    return {
        "searchers_added": len(searchers) - cfg.searcher.searchers,
        "searchers_removed": sum(p.done == "removed" for p in searchers),
        "searchers_killed": 1,
        "prompts": len(prompts),
        "prompts_partitions": cfg.topics.partitions,
        "prompts_never_served": len(set().union(*(set(p["unserved"]) for p in phases.values()))),
        "max_stall_s": round(max(b - a for a, b in zip(times, [*times[1:], stopped_at], strict=True)), 1),
        "lost": sum(max(0, n - in_raw[name]) for name, n in acked.items()),
        "acked_per_searcher": acked,
        "raw_per_searcher": dict(in_raw),  # the added searcher served too
        "restarts": {p.name: p.restarts for p in searchers},
        "phases": phases,
    }


def main() -> None:
    from bench.results import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-timeout-s", type=float, default=180.0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/elastic.json"))
    parser.add_argument("--keep", default=None, help="Keep the job's directory (logs, run dir, broker data) here.")
    args = parser.parse_args()
    with tiny_job(args.keep) as cfg:
        cfg = with_overrides(cfg, kafka={"namespace": "elastic"}, topics={"partitions": 4}, run={"filters": 1},
                             searcher={"searchers": 2}, task={"train_size": 24},
                             # a version every ~3 s, not every step (~8 a second with the tiny model): searchers
                             # then keep within max_policy_lag rather than pausing, and a new one serves at once
                             trainer={"sync_every": 20})  # fmt: skip
        result = run_elastic(cfg, args.phase_timeout_s)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
