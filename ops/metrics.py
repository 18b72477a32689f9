"""Prometheus metrics on /metrics, one endpoint per role process (names and labels: README).

Each role already counts what it does in a plain stats object; a collector reads those at scrape
time, so the hot paths carry no metrics code and the numbers cannot drift from the logs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "tba"
STALENESS_BOUND = 16  # the staleness histogram's largest finite bucket (trainer/train.py counts by it)


# -- the held-out evaluation's statistics (trainer/evaluation.py writes the rows, tba/report.py reads them) --


def mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def standard_error(xs) -> float:
    """Of the mean of xs (sample standard deviation over sqrt n)."""
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def paired_gain(first: dict, last: dict) -> tuple[float, float]:
    """Greedy accuracy gain from evaluation first to last and its standard error, problem by problem: the same
    held-out problems both times, so what both solve (or both miss) adds no noise."""
    pairs = [(a, b) for a, b in zip(first["greedy_solved"], last["greedy_solved"], strict=True) if "-" not in (a, b)]
    gains = np.array([int(b) - int(a) for a, b in pairs], dtype=float)
    return mean(gains), standard_error(gains)


class MetricsLog:
    """The trainer's run_dir/metrics.jsonl, a JSON row a step, bounded: past max_mb it moves to metrics.jsonl.1
    (.1 to .2, ...), and the oldest of `backups` goes. The row of every step of a week-long job would
    otherwise fill the disk a little more each day."""

    def __init__(self, run_dir: Path, max_mb: float, backups: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.max_bytes, self.backups = int(max_mb * 1e6), backups
        self.file = open(self.path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.file.tell() >= self.max_bytes:
            self.file.close()
            for i in range(self.backups, 0, -1):  # .backups is dropped, each older one moves up by one
                older = self.path.with_name(f"{self.path.name}.{i - 1}" if i > 1 else self.path.name)
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i}"))
            if self.backups == 0:
                self.path.unlink()
            self.file = open(self.path, "a")

    def close(self) -> None:
        self.file.close()


class MetricsTail:
    """The rows appended to run_dir/metrics.jsonl since the last call, for a reader that looks every second (the
    live view): it reads what is new, not the whole file each time (which grew with every step of the job),
    and starts a rotated file from its beginning."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.inode, self.position, self.partial = None, 0, b""

    def new_rows(self) -> list[dict]:
        try:
            file = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with file:
            stat = os.fstat(file.fileno())
            if stat.st_ino != self.inode or stat.st_size < self.position:  # a new file: rotated, or a new run
                self.inode, self.position, self.partial = stat.st_ino, 0, b""
            file.seek(self.position)
            data = file.read()
        self.position += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")  # a line still being written waits
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def metric_rows(run_dir: Path) -> list[dict]:
    """The rows the trainer appended to run_dir/metrics.jsonl and its rotated files, oldest first (none if
    there is no such file yet).

    A last line still being written, or cut short by a kill, is left out rather than failing the reader.
    """
    current = Path(run_dir) / "metrics.jsonl"
    rotated = sorted(current.parent.glob("metrics.jsonl.[0-9]*"), key=lambda p: -int(p.suffix[1:]))
    rows = []
    for path in [*rotated, current]:
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class RoleCollector:
    """Turns a role's stats into metric families at every scrape."""

    def __init__(self, read: Callable[[], Iterable[Metric]]):
        self.read = read

    def collect(self) -> Iterable[Metric]:
        yield from self.read()


def serve_metrics(port: int, read: Callable[[], Iterable[Metric]], host: str = "127.0.0.1"):
    """Serve read()'s metrics on http://host:port/metrics in a daemon thread; returns the server."""
    registry = CollectorRegistry()
    registry.register(RoleCollector(read))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


@contextmanager
def metrics_served(port: int | None, read: Callable[[], Iterable[Metric]]):
    """serve_metrics for the duration of a with-block; nothing when port is None or 0."""
    server = serve_metrics(port, read) if port else None
    try:
        yield server
    finally:
        if server is not None:
            server.shutdown()


def _gauge(name: str, doc: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, value: float, labels: dict[str, str]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def searcher_metrics(searcher) -> Iterable[Metric]:
    s, labels = searcher.stats, {"searcher": str(searcher.index)}
    yield _counter("searcher_groups", "Trajectory groups published", s.groups, labels)
    yield _counter("searcher_samples", "Completions generated", s.samples, labels)
    yield _counter("searcher_tokens", "Completion tokens generated", s.tokens, labels)
    yield _counter("searcher_batches", "Generation batches", s.batches, labels)
    yield _counter("searcher_paused_batches", "Batches skipped for max policy lag", s.paused, labels)
    yield _counter("searcher_weight_swaps", "Policy versions loaded", s.swaps, labels)
    yield _counter("searcher_unscored_groups", "Groups not sent: their reward failed", s.unscored, labels)
    yield _counter("searcher_idle_steps", "Looks for prompts that found none", s.idle, labels)
    yield _gauge("searcher_policy_version", "Version it generates with", searcher.policy_version, labels)
    yield _gauge("searcher_mean_reward", "Mean reward of all its samples", s.mean_reward, labels)


def gateway_metrics(gateway) -> Iterable[Metric]:
    requests = CounterMetricFamily(f"{PREFIX}_gateway_requests", "HTTP requests answered", labels=["route", "status"])
    for (route, status), n in sorted(dict(gateway.requests).items()):  # a copy: requests go on meanwhile
        requests.add_metric([route, str(status)], n)
    yield requests
    groups = gateway.groups
    yield _gauge("gateway_open_groups", "Groups served, awaiting rewards", len(groups), {})
    yield _counter("gateway_groups", "Groups produced to raw (all rewards in)", groups.stats.produced, {})
    yield _counter("gateway_expired_groups", "Groups sent to the dlq without all rewards", groups.stats.expired, {})
    yield _counter("gateway_batches", "Generation batches (generate calls)", gateway.batcher.stats.batches, {})
    yield _gauge("gateway_policy_version", "Version it generates with", gateway.policy_version, {})


def filter_metrics(consumer, instance: str) -> Iterable[Metric]:
    s = consumer.stats
    yield _counter("filter_consumed", "Raw records routed", s.consumed, {"instance": instance})
    yield _counter("filter_accepted", "Groups published to curated", s.accepted, {"instance": instance})
    labels = ["instance", "scorer"]
    rejected = CounterMetricFamily(f"{PREFIX}_filter_rejected", "Records sent to the dlq", labels=labels)
    for scorer, n in sorted(s.rejected.items()):
        rejected.add_metric([instance, scorer], n)
    yield rejected
    yield _counter("filter_transactions", "Committed transactions", s.transactions, {"instance": instance})
    yield _counter("filter_aborts", "Aborted transactions (batches re-read)", s.aborts, {"instance": instance})


def trainer_metrics(trainer) -> Iterable[Metric]:
    labels: dict[str, str] = {}
    yield _counter("trainer_steps", "Optimizer steps", trainer.step, labels)
    yield _gauge("trainer_policy_version", "Newest published policy version", trainer.policy_version, labels)
    yield _counter("trainer_wait_seconds", "Seconds spent waiting for data", trainer.waited_s, labels)
    if trainer.buffer is not None:
        yield _gauge("trainer_buffer_groups", "Groups in the replay buffer", len(trainer.buffer), labels)
        yield _gauge("trainer_buffer_prompts", "Prompts in the replay buffer", trainer.buffer.num_prompts, labels)
        yield _gauge("trainer_replay_ratio", "Prompts trained per group received", trainer.replay_ratio, labels)
        yield _gauge(
            "trainer_ready", "1: a step has what it needs (buffer, replay bound)", float(trainer.ready), labels
        )
        ingested = sum(trainer.buffer.next_offsets.values())
        yield _gauge("trainer_curated_offset", "Next curated offsets to ingest (sum)", ingested, labels)
        yield _counter("trainer_rejected_groups", "Curated groups it cannot train on (to the dlq)",
                       trainer.buffer.rejected, labels)  # fmt: skip
        yield _gauge("trainer_unreadable_groups", "Buffered groups gone from Kafka (retention), dropped",
                     len(trainer.buffer.unreadable), labels)  # fmt: skip
    last = trainer.last.get("train", {})
    for key, doc in (("loss", "Loss of the last step"), ("mean_reward", "Mean reward of the last batch"),
                     ("beta", "TB beta of the last step"), ("seconds", "Seconds of the last step")):  # fmt: skip
        if key in last:
            yield _gauge(f"trainer_{key}", doc, last[key], labels)
    evaluation = trainer.last.get("eval", {})
    for key in ("greedy_accuracy", "sampled_reward"):
        if key in evaluation:
            yield _gauge(f"eval_{key}", f"Held-out {key.replace('_', ' ')} (last evaluation)", evaluation[key], labels)
    # staleness of every trained sample, in policy versions, as a cumulative histogram
    bounds = [0, 1, 2, 4, 8, STALENESS_BOUND]
    counts = dict(trainer.staleness_counts)  # a copy in one step: the training thread adds to it meanwhile
    buckets = [(str(b), sum(n for v, n in counts.items() if v <= b)) for b in bounds]
    buckets.append(("+Inf", sum(counts.values())))
    histogram = HistogramMetricFamily(f"{PREFIX}_trainer_sample_staleness", "Policy versions behind, per sample")
    histogram.add_metric([], buckets, sum_value=float(trainer.staleness_sum))
    yield histogram
