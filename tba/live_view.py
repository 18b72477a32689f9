"""The live terminal view of `tba run` (rich): processes, throughput (the gateway's requests, open and expired
groups), Kafka lag, learning.

It reads what anyone could read from outside: each process's /metrics endpoint, the topics' end
offsets and the filter group's committed offsets, and the trainer's run_dir/metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import threading
import time
import urllib.request
from collections import defaultdict, deque
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ops.metrics import MetricsTail

KAFKA_EVERY_S = 5.0  # end offsets and group offsets cost a few round trips: not every second
RATE_WINDOW_S = 60.0  # rates over the last minute: a trainer step every ~8 s, read over one second, showed mostly 0


def scrape(port: int, timeout_s: float = 0.5) -> dict[str, float]:
    """name -> value summed over labels (histograms: their buckets as name{le}); {} if unreachable."""
    values: dict[str, float] = defaultdict(float)
    try:  # a port not (yet) ours, or not Prometheus at all, must never take the job down
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name if "le" not in sample.labels else f"{sample.name}{{{sample.labels['le']}}}"
                values[name] += sample.value
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    return dict(values)


class JobView:
    """Call it with the supervisor once a second; its `renderable` is what rich.live shows."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.history: dict[str, deque[tuple[float, dict[str, float]]]] = defaultdict(deque)  # name -> (time, scrape)
        self.started: dict[str, float] = {}  # name -> when the process scraped was started
        self.rates: dict[str, dict[str, float]] = {}
        self.metrics: MetricsTail | None = None  # the trainer's metrics.jsonl, read as it grows
        self.evals: deque[dict] = deque(maxlen=5)  # the newest evaluations
        self.kafka: dict = {}
        self.kafka_at = 0.0
        # Kafka is read on a thread of its own: a broker away makes each read wait for the client timeout,
        # and the supervisor calling this view must not wait with it
        self._reading: threading.Thread | None = None
        self.renderable = Text("starting...")

    def __call__(self, supervisor) -> None:
        self.cfg = supervisor.cfg  # resolved: the job's own namespace and ports
        now = time.monotonic()
        scraped = {}
        for p in supervisor.processes:
            if p.metrics_port and p.running:
                scraped[p.name] = scrape(p.metrics_port)
                self.note(p.name, now, scraped[p.name], p.started_at)
        reading = self._reading is not None and self._reading.is_alive()
        if not reading and now - self.kafka_at >= KAFKA_EVERY_S:
            self.kafka_at = now
            self._reading = threading.Thread(target=self._read_kafka_into_view, daemon=True, name="live-view-kafka")
            self._reading.start()
        elif reading and now - self.kafka_at >= KAFKA_EVERY_S:  # longer than a read takes when Kafka answers
            self.kafka = {"error": f"waiting for Kafka at {self.cfg.kafka.bootstrap} to answer"}
        self.renderable = self.render(supervisor.state(), scraped)

    def note(self, name: str, now: float, current: dict[str, float], started_at: float = 0.0) -> None:
        """A process's scrape at now; its rates are then over its scrapes of the last RATE_WINDOW_S. A restart
        (started_at changed, or a counter lower than before: it counts from 0 again) starts the window again."""
        if not current:  # nothing answered: no sample, rather than a drop to 0 and a jump back
            return
        samples = self.history[name]
        restarted = self.started.get(name, started_at) != started_at
        if restarted or samples and any(v < samples[-1][1].get(k, 0.0) for k, v in current.items() if "_total" in k):
            samples.clear()
        self.started[name] = started_at
        samples.append((now, current))
        while now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        then, before = samples[0]
        span = now - then
        self.rates[name] = {k: (v - before.get(k, 0.0)) / span for k, v in current.items()} if span > 0 else {}

    def _read_kafka_into_view(self) -> None:
        self.kafka = self._read_kafka()

    def _read_kafka(self) -> dict:
        from kafka.errors import CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError

        from ops.names import topic_names
        from ops.topics import end_offsets
        from tba.inspection import filter_lag

        try:
            names = topic_names(self.cfg)  # the ends alone: no codec needed
            ends = end_offsets(self.cfg, [names.raw, names.curated, names.dlq])
            ends = {"raw": ends[names.raw], "curated": ends[names.curated], "dlq": ends[names.dlq]}
            try:
                lag = str(sum(filter_lag(self.cfg).values()))
            except (CoordinatorNotAvailableError, CoordinatorLoadInProgressError, NotCoordinatorError):
                lag = "waiting for the filter group's coordinator"  # a new broker still loading its offsets
            return {"ends": ends, "filter_lag": lag}
        except Exception as exc:  # the broker may be restarting: show it, keep going
            return {"error": f"{type(exc).__name__}: {exc}"}

    def render(self, state: dict, scraped: dict[str, dict[str, float]]) -> Group:
        elapsed, budget = state["elapsed_s"], state["budget_s"]
        eta = f", {budget - elapsed:.0f}s of the budget left" if budget else ""
        header = Text(f"tba run · {state['namespace']} @ {state['bootstrap']} · {elapsed:.0f}s{eta}", style="bold")

        procs = Table(title="processes", expand=True)
        for column in ("process", "status", "pid", "restarts", "throughput"):
            procs.add_column(column)
        for p in state["processes"]:
            procs.add_row(p["name"], p["status"], str(p["pid"] or ""), str(p["restarts"]), self._throughput(p))

        trainer = scraped.get("trainer", {})
        learning = Table(title="learning", expand=True)
        for column in ("step", "policy version", "loss", "batch reward", "held-out accuracy", "buffer groups"):
            learning.add_column(column)
        learning.add_row(
            f"{trainer.get('tba_trainer_steps_total', 0):.0f}",
            f"{trainer.get('tba_trainer_policy_version', 0):.0f}",
            f"{trainer.get('tba_trainer_loss', float('nan')):.3g}",
            f"{trainer.get('tba_trainer_mean_reward', float('nan')):.3f}",
            self._accuracy_trend(),
            f"{trainer.get('tba_trainer_buffer_groups', 0):.0f}",
        )

        kafka = Table(title="kafka", expand=True)
        if "error" in self.kafka:
            kafka.add_column("broker")
            kafka.add_row(self.kafka["error"])
        elif self.kafka:
            ends = self.kafka["ends"]
            curated_end = ends["curated"]
            for column in ("raw end", "filter lag", "curated end", "trainer lag", "dlq end"):
                kafka.add_column(column)
            kafka.add_row(
                str(ends["raw"]),
                self.kafka["filter_lag"],
                str(curated_end),
                # the trainer keeps its offsets in its checkpoint, not in a group (a transaction marker counts 1)
                str(max(0, curated_end - int(trainer.get("tba_trainer_curated_offset", 0)))) if trainer else "",
                str(ends["dlq"]),
            )
        return Group(header, procs, learning, kafka, self._staleness(trainer))

    def _throughput(self, p: dict) -> str:
        rate = self.rates.get(p["name"], {})
        if p["role"] == "searcher":
            groups, tokens = rate.get("tba_searcher_groups_total", 0), rate.get("tba_searcher_tokens_total", 0)
            return f"{groups:.2f} groups/s, {tokens:.0f} tok/s"
        if p["role"] == "filter":
            return f"{rate.get('tba_filter_consumed_total', 0):.1f} records/s"
        if p["role"] == "gateway":  # requests per second, and the groups now awaiting rewards and expired so far
            now = self.history[p["name"]][-1][1] if self.history[p["name"]] else {}
            return (f"{rate.get('tba_gateway_requests_total', 0):.1f} req/s, "
                    f"{now.get('tba_gateway_open_groups', 0):.0f} open, "
                    f"{now.get('tba_gateway_expired_groups_total', 0):.0f} expired groups")  # fmt: skip
        return f"{60 * rate.get('tba_trainer_steps_total', 0):.1f} steps/min"

    def _accuracy_trend(self) -> str:
        if self.metrics is None:
            self.metrics = MetricsTail(Path(self.cfg.trainer.run_dir))
        self.evals.extend(r for r in self.metrics.new_rows() if r["kind"] == "eval")
        return " -> ".join(f"{r['greedy_accuracy']:.2f}" for r in self.evals)

    @staticmethod
    def _staleness(trainer: dict[str, float]) -> Text:
        """Trained samples by policy versions behind (bucket counts from the trainer's histogram), their mean, and
        how often the history was reused (prompts trained per group received)."""
        bounds = ["0", "1", "2", "4", "8", "16", "+Inf"]
        cumulative = [trainer.get(f"tba_trainer_sample_staleness_bucket{{{b}}}", 0.0) for b in bounds]
        counts = [c - p for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
        total = max(1.0, cumulative[-1])
        mean = trainer.get("tba_trainer_sample_staleness_sum", 0.0) / total
        ratio = trainer.get("tba_trainer_replay_ratio", 0.0)
        lines = [f"staleness of trained samples (policy versions behind): mean {mean:.1f}; replay ratio {ratio:.2f}"]
        for bound, count in zip(["0", "1", "2", "3-4", "5-8", "9-16", ">16"], counts, strict=True):
            lines.append(f"  {bound:>5} {'█' * int(40 * count / total):<40} {count:.0f}")
        return Text("\n".join(lines))


@contextlib.contextmanager
def shown(cfg, verbose: bool):
    """How `tba run` shows the job: yields (refresh, progress) for the supervisor; live in a terminal (log lines
    above it, a spinner while a long wait lasts), else (logs, CI, tests) the view printed as text every 30 s."""
    import logging

    from rich.console import Console
    from rich.live import Live
    from rich.logging import RichHandler
    from rich.spinner import Spinner

    from tba.logs import configure_logging

    view = JobView(cfg)
    if not (cfg.run.live_view and sys.stdout.isatty()):
        last = [0.0]

        def every_30_s(supervisor) -> None:
            if time.monotonic() - last[0] >= 30.0:
                last[0] = time.monotonic()
                view(supervisor)
                Console(width=120).print(view.renderable)

        yield every_30_s, None
        return
    handler = RichHandler(show_path=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    configure_logging(verbose, handler, replace=True)
    with Live(view.renderable, refresh_per_second=2) as live:

        def refresh(supervisor) -> None:
            view(supervisor)
            live.update(view.renderable)

        def progress(message: str):
            live.update(Spinner("dots", message))
            return contextlib.nullcontext()

        yield refresh, progress
