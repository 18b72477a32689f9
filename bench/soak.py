"""The whole job for hours at full speed, watched from outside: does anything grow that should not?

    python bench/soak.py [--hours 2] [--every-s 15]  ->  bench/results/soak.json and soak.png

`tba run` of every role on tiny random models and the toy task: two searchers, two filters, the gateway
(agent threads of this process call it with the `openai` client and post rewards), a trainer that publishes
a new policy version every step and checkpoints every `--checkpoint-every` steps. Every `--every-s` seconds,
from outside the job: each process's RSS, open fds and threads (/proc), the broker's JVM heap in use (jstat,
once a minute), /dev/shm, the disk held by the broker's data dir (per topic), the run dir and the trainer's
spill file, and the job's progress (steps, policy version, groups, filter and trainer lag, restarts).

Slopes are least-squares fits over the samples after `--warmup-min` minutes, within one life of each process
(a restarted role counts from its new start). Each sample is also appended to soak.partial.jsonl as it is
taken (removed at the end), so a soak cut short still shows what it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from gateway_agent import agent_round  # noqa: E402

from bench.results import measured_commit, write_results  # noqa: E402
from ops import kafka_clients  # noqa: E402
from ops.broker import job_broker  # noqa: E402
from ops.config import load_config  # noqa: E402
from ops.names import topic_names  # noqa: E402
from ops.topics import topic_partitions  # noqa: E402
from tba.inspection import filter_lag  # noqa: E402
from tba.live_view import scrape  # noqa: E402
from tests.gateway_job import gateway_job  # noqa: E402

MB = 1 << 20


def process(pid: int) -> dict | None:
    """RSS (MB), open fds and threads of one process, from /proc; None once it is gone."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {
            "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
        }
    except (FileNotFoundError, ProcessLookupError, KeyError):
        return None


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def disk_mb(path: Path) -> float:
    """Blocks held (not apparent size: Kafka preallocates its index files sparse)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:  # a segment deleted by retention, a checkpoint pruned, while we walked
                pass
    return total / MB


def topic_mb(data_dir: Path, namespace: str) -> dict[str, float]:
    """The broker's disk per topic of this job ('<topic>-<partition>' directories; internal topics as one)."""
    sizes: dict[str, float] = {}
    for dirpath, dirs, _ in os.walk(data_dir):
        for d in dirs:
            topic, _, partition = d.rpartition("-")
            if partition.isdigit() and topic:
                name = topic.removeprefix(f"{namespace}.") if topic.startswith(namespace) else "kafka internal"
                sizes[name] = sizes.get(name, 0.0) + disk_mb(Path(dirpath) / d)
        dirs[:] = [d for d in dirs if not d.rpartition("-")[2].isdigit()]
    return sizes


def spill_mb(trainer_pid: int) -> float:
    """The trainer's spill file is unlinked from birth (O_TMPFILE: it has no name): the deleted files it holds open."""
    total = 0
    try:
        for fd in Path(f"/proc/{trainer_pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
                if link.endswith("(deleted)") and not link.startswith(("/memfd:", "/dev/shm")):  # memory, not disk
                    total += os.stat(fd).st_blocks * 512
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        pass
    return total / MB


def jvm_heap_mb(pid: int) -> float | None:
    """Heap in use (survivors + eden + old) from `jstat -gc`, or None if it does not answer."""
    try:
        out = subprocess.run(["jstat", "-gc", str(pid)], capture_output=True, text=True, timeout=30).stdout.split()
        half = len(out) // 2
        row = dict(zip(out[:half], out[half:], strict=True))
        return sum(float(row[k]) for k in ("S0U", "S1U", "EU", "OU")) / 1024
    except (OSError, subprocess.TimeoutExpired, KeyError, ValueError):
        return None


class Agents:
    """Agent threads calling the gateway for the whole soak; errors (a gateway restarting) counted, not fatal."""

    def __init__(self, client, clients: int):
        self.client, self.rounds, self.errors = client, 0, 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        model = self.client.models.list().data[0].id
        while not self.stopping.is_set():
            try:
                agent_round(self.client, model, rng)
                self.rounds += 1
            except Exception:
                self.errors += 1
                self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)


def sample(cfg, started: float, names, consumer, agents: Agents, heap: bool) -> dict:
    job = json.loads((Path(cfg.trainer.run_dir) / "job.json").read_text())
    broker = job_broker(cfg).status()
    procs, metrics = {}, {}
    for p in job["processes"]:
        if p["pid"]:
            procs[p["name"]] = {"pid": p["pid"], "restarts": p["restarts"], **(process(p["pid"]) or {})}
            metrics[p["name"]] = scrape(p["metrics_port"], timeout_s=5) if p["metrics_port"] else {}
    trainer = next(p for p in job["processes"] if p["role"] == "trainer")
    if trainer["pid"]:
        supervisor = parent(trainer["pid"])
        procs["supervisor"] = {"pid": supervisor, "restarts": 0, **(process(supervisor) or {})}
    if broker:
        procs["broker"] = {"pid": broker.pid, "restarts": job["broker_restarts"], **(process(broker.pid) or {})}
        if heap:
            procs["broker"]["heap_mb"] = jvm_heap_mb(broker.pid)
    t = metrics.get("trainer", {})
    curated_end = sum(consumer.end_offsets(topic_partitions(cfg, consumer, names.curated)).values())
    return {
        "t_min": (time.monotonic() - started) / 60,
        "processes": procs,
        "shm_mb": shutil.disk_usage("/dev/shm").used / MB,
        "run_dir_mb": disk_mb(Path(cfg.trainer.run_dir)),
        "kafka_mb": topic_mb(Path(cfg.broker.data_dir), cfg.kafka.namespace),
        "spill_mb": spill_mb(trainer["pid"]) if trainer["pid"] else 0.0,
        "steps": t.get("tba_trainer_steps_total", 0.0),
        "policy_version": t.get("tba_trainer_policy_version", 0.0),
        "buffer_groups": t.get("tba_trainer_buffer_groups", 0.0),
        "searcher_groups": sum(m.get("tba_searcher_groups_total", 0.0) for m in metrics.values()),
        "agent_rounds": agents.rounds,
        "agent_errors": agents.errors,
        "filter_lag": sum(filter_lag(cfg).values()),
        "trainer_lag": max(0, curated_end - int(t.get("tba_trainer_curated_offset", 0))),
        "curated_end": curated_end,
    }


def slope_per_h(samples: list[dict], value, warmup_min: float) -> float | None:
    """Least-squares slope (per hour) of value(sample) over the samples after warmup; None if under 3."""
    points = [(s["t_min"] / 60, v) for s in samples if s["t_min"] >= warmup_min and (v := value(s)) is not None]
    if len(points) < 3:
        return None
    hours, values = np.array(points).T
    return float(np.polyfit(hours, values, 1)[0])


def summarise(samples: list[dict], warmup_min: float, cfg) -> dict:
    late = [s for s in samples if s["t_min"] >= warmup_min]
    roles = {name for s in samples for name in s["processes"]}
    per_role = {}
    for name in sorted(roles):
        seen = [s for s in samples if "rss_mb" in s["processes"].get(name, {})]
        last_pid = seen[-1]["processes"][name]["pid"] if seen else None
        life = [s for s in seen if s["processes"][name]["pid"] == last_pid]  # the last life only, from its own
        life = [s for s in life if s["t_min"] >= life[0]["t_min"] + warmup_min]  # start past the warm-up

        per_role[name] = {
            "rss_mb_first": life[0]["processes"][name]["rss_mb"] if life else None,
            "rss_mb_last": life[-1]["processes"][name]["rss_mb"] if life else None,
            "rss_slope_mb_per_h": slope_per_h(life, lambda r, n=name: r["processes"][n]["rss_mb"], 0),
            "life_from_min": life[0]["t_min"] if life else None,
            "fds_first": life[0]["processes"][name]["fds"] if life else None,
            "fds_last": life[-1]["processes"][name]["fds"] if life else None,
            "fds_max": max((s["processes"][name]["fds"] for s in life), default=None),
            "threads_first": life[0]["processes"][name]["threads"] if life else None,
            "threads_last": life[-1]["processes"][name]["threads"] if life else None,
            "restarts": samples[-1]["processes"].get(name, {}).get("restarts"),
        }
    topics = sorted({t for s in samples for t in s["kafka_mb"]})
    first, last = samples[0], samples[-1]
    hours = last["t_min"] / 60
    heap = [s["processes"]["broker"].get("heap_mb") for s in late if s["processes"].get("broker", {}).get("heap_mb")]
    return {
        "hours": hours,
        "warmup_min": warmup_min,
        "rss_slope_mb_per_h": {n: r["rss_slope_mb_per_h"] for n, r in per_role.items()},
        "fds_growth": {
            n: (r["fds_last"] - r["fds_first"]) if r["fds_first"] is not None else None for n, r in per_role.items()
        },  # fmt: skip
        "threads_growth": {
            n: (r["threads_last"] - r["threads_first"]) if r["threads_first"] is not None else None
            for n, r in per_role.items()
        },  # fmt: skip
        "broker_heap": {
            "heap_max_mb": cfg.broker.heap,
            "in_use_mb_max": max(heap, default=None),
            "in_use_slope_mb_per_h": slope_per_h(late, lambda s: s["processes"]["broker"].get("heap_mb"), warmup_min),
        },  # fmt: skip
        "run_dir_mb_per_h": slope_per_h(samples, lambda s: s["run_dir_mb"], warmup_min),
        "run_dir_mb_last": last["run_dir_mb"],
        "kafka_mb_per_h": {
            topic: slope_per_h(samples, lambda row, topic=topic: row["kafka_mb"].get(topic, 0.0), warmup_min)
            for topic in topics
        },
        "kafka_mb_last": last["kafka_mb"],
        "spill_mb_last": last["spill_mb"],
        "shm_mb_max": max(s["shm_mb"] for s in samples),
        "bounds": {
            "run_dir": f"checkpoints: the newest {cfg.trainer.keep_checkpoints} (trainer.keep_checkpoints); "
            f"metrics.jsonl: {cfg.trainer.metrics_max_mb} MB x {cfg.trainer.metrics_backups + 1} files; "
            f"each role's log: {cfg.run.log_max_mb} MB x {cfg.run.log_backups + 1} files",
            "raw": f"topics.raw_retention_gb = {cfg.topics.raw_retention_gb} (and its retention time)",
            "dlq": f"topics.dlq_retention_gb = {cfg.topics.dlq_retention_gb} (and its retention time)",
            "curated": "the job's history: kept by design, grows with the groups that pass",
            "spill": f"buffer.spill_gb = {cfg.buffer.spill_gb} and the disk's free space less a reserve",
        },
        "progress": {
            "steps": last["steps"],
            "steps_per_s": (last["steps"] - first["steps"]) / max(1.0, 60 * (last["t_min"] - first["t_min"])),
            "policy_version": last["policy_version"],
            "curated_groups": last["curated_end"],
            "searcher_groups": last["searcher_groups"],
            "agent_rounds": last["agent_rounds"],
            "agent_errors": last["agent_errors"],
            "filter_lag_median_late": float(np.median([s["filter_lag"] for s in late])) if late else None,
            "trainer_lag_median_late": float(np.median([s["trainer_lag"] for s in late])) if late else None,
        },
        "per_role": per_role,
    }


def plot(samples: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_min"] / 60 for s in samples]
    names = sorted({n for s in samples for n in s["processes"]})
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for name in names:
        axes[0][0].plot(t, [s["processes"].get(name, {}).get("rss_mb", np.nan) for s in samples], label=name)
        axes[0][1].plot(t, [s["processes"].get(name, {}).get("fds", np.nan) for s in samples], label=name)
    axes[0][0].set(title="RSS (MB)", xlabel="hours")
    axes[0][1].set(title="open fds", xlabel="hours")
    axes[0][0].legend(fontsize=7)
    disk = axes[1][0]
    disk.plot(t, [s["run_dir_mb"] for s in samples], label="run dir")
    disk.plot(t, [s["spill_mb"] for s in samples], label="spill file")
    for topic in sorted({k for s in samples for k in s["kafka_mb"]}):
        disk.plot(t, [s["kafka_mb"].get(topic, 0.0) for s in samples], label=f"kafka: {topic}")
    disk.set(title="disk (MB)", xlabel="hours")
    disk.legend(fontsize=7)
    work = axes[1][1]
    work.plot(t, [s["steps"] for s in samples], label="trainer steps")
    work.plot(t, [s["curated_end"] for s in samples], label="curated groups")
    work.set(title="progress", xlabel="hours")
    lag = work.twinx()
    lag.plot(t, [s["filter_lag"] for s in samples], "r:", label="filter lag")
    lag.plot(t, [s["trainer_lag"] for s in samples], "k:", label="trainer lag")
    work.legend(loc="upper left", fontsize=7)
    lag.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--every-s", type=float, default=15.0)
    parser.add_argument("--warmup-min", type=float, default=15.0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/soak.json"))
    parser.add_argument("--summarise", metavar="JSON", help="Summarise (and plot) the samples of a soak again.")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarise:  # the measurement stays that of its commit; the analysis is this one's
        measured = json.loads(Path(args.summarise).read_text())
        cfg = load_config(environ={}, **measured["job"])
        summary = summarise(measured["samples"], args.warmup_min, cfg)
        plot(measured["samples"], out.with_suffix(".png"))
        keep = {k: measured[k] for k in ("commit", "complete", "config", "job") if k in measured}
        write_results(out, {**keep, "summarised_at": measured_commit(), **summary, "samples": measured["samples"]})
        return
    commit, partial = measured_commit(), out.with_suffix(".partial.jsonl")
    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="tba-soak-") as tmp:
        root = Path(tmp)
        shape = {"searchers": 2, "filters": 2, "checkpoint_every": args.checkpoint_every}
        with gateway_job(root, budget_s=args.hours * 3600 + 900, **shape) as (cfg, client):
            agents = Agents(client, args.clients)
            consumer = kafka_clients.consumer(cfg)
            names, samples = topic_names(cfg), []
            started = time.monotonic()
            try:
                while (elapsed := time.monotonic() - started) < args.hours * 3600:
                    heap = len(samples) % max(1, round(60 / args.every_s)) == 0
                    samples.append(sample(cfg, started, names, consumer, agents, heap))
                    with open(partial, "a") as f:  # a line a sample: what a soak cut short saw
                        f.write(json.dumps({"commit": commit, **samples[-1]}) + "\n")
                    time.sleep(max(0.0, args.every_s - (time.monotonic() - started - elapsed)))
            finally:
                agents.stop()
                consumer.close()
        summary = summarise(samples, args.warmup_min, cfg)
    plot(samples, out.with_suffix(".png"))
    config = {"searchers": 2, "filters": 2, "gateway_clients": args.clients, "sync_every": 1,
              "checkpoint_every": args.checkpoint_every, "every_s": args.every_s, "model": "tiny random llama",
              "load_1_5_15_end": os.getloadavg()}  # fmt: skip
    job = cfg.model_dump(mode="json")
    write_results(out, {"complete": True, "config": config, "job": job, **summary, "samples": samples})
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
