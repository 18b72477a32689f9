"""Stalled roles: a process alive but stuck is restarted by the supervisor, saying why.

A crash is easy to see; a searcher stuck in a call that never returns, a filter whose transaction waits
forever or a trainer whose loop stopped taking steps look alive to a supervisor that only watches exit
codes, and a job then stalls in silence. Every `run.stall_s`, with the roles' metrics endpoints:

- a role whose /metrics has not answered for `stall_s` is stuck whole (stopped, deadlocked);
- a trainer that took no step while it was ready to (enough prompts, within its replay bound);
- a searcher that neither produced a group, paused for lag, nor looked for prompts and found none;
- a filter that routed nothing while the raw partitions it holds had records it had not committed.

A role that has no work (an idle filter, a trainer waiting for groups, a gateway nobody calls) is never
stalled. Each look is a scrape and, for filters, two Kafka requests, on the supervisor's heal thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Seen:
    progress: float | None = None  # the role's progress count at the last change
    since: float = 0.0  # when it last changed, or the role last answered / started


def progress_and_work(role: str, metrics: dict[str, float], lag: int | None) -> tuple[float, bool] | None:
    """(a count that grows while the role does its job, whether it had work to do), None for a role not watched
    this way. lag: a filter's records not committed yet on the raw partitions it holds."""
    if role == "trainer":
        steps = metrics.get("tba_trainer_steps_total", 0.0)
        return steps, metrics.get("tba_trainer_ready", 0.0) >= 1
    if role == "searcher":
        names = ("groups", "paused_batches", "idle_steps")
        return sum(metrics.get(f"tba_searcher_{n}_total", 0.0) for n in names), True
    if role == "filter":
        names = ("consumed", "transactions")  # not aborts: a filter aborting batch after batch is stuck too
        return sum(metrics.get(f"tba_filter_{n}_total", 0.0) for n in names), bool(lag)
    return None


class StallWatch:
    """look() each role's metrics (and a filter's lag); the reason it is stalled, or None."""

    STARTUP = 3  # stall_s times this for a process to answer a first time: loading models comes before /metrics

    def __init__(self, stall_s: float):
        self.stall_s = stall_s
        self.seen: dict[str, Seen] = {}
        self.answered: dict[str, float] = {}
        self.starting: set[str] = set()  # not answered since it (re)started

    def started(self, name: str, now: float | None = None) -> None:
        """A (re)started process gets STARTUP x stall_s to answer, then stall_s for anything else."""
        now = time.monotonic() if now is None else now
        self.seen[name] = Seen(None, now)
        self.answered[name] = now
        self.starting.add(name)

    def look(self, name: str, role: str, metrics: dict[str, float], lag: int | None = None,
             now: float | None = None) -> str | None:  # fmt: skip
        now = time.monotonic() if now is None else now
        seen = self.seen.setdefault(name, Seen(None, now))
        if not metrics:
            quiet = now - self.answered.setdefault(name, now)
            if quiet < self.stall_s * (self.STARTUP if name in self.starting else 1):
                return None
            return f"its metrics endpoint has not answered for {quiet:.0f}s"
        self.answered[name] = now
        self.starting.discard(name)
        found = progress_and_work(role, metrics, lag)
        if found is None:
            return None
        progress, had_work = found
        if progress != seen.progress or not had_work:  # moving, or rightly idle: the clock starts again
            self.seen[name] = Seen(progress, now)
            return None
        if now - seen.since < self.stall_s:
            return None
        what = {"trainer": "no step with a buffer to train on", "searcher": "no group, pause or look for prompts",
                "filter": f"nothing routed with {lag} records waiting on its partitions"}[role]  # fmt: skip
        return f"{what} for {now - seen.since:.0f}s"


def filter_member_lag(cfg) -> dict[str, int]:
    """Filter instance ("0", "1", ...) -> records not committed yet on the raw partitions it holds now."""
    from ops import kafka_clients
    from ops.names import filter_group, filter_instance_prefix
    from tba.inspection import filter_lag

    group = filter_group(cfg)
    lag = filter_lag(cfg)
    admin = kafka_clients.admin(cfg)
    try:
        members = admin.describe_groups([group]).get(group, {}).get("members", [])
    finally:
        admin.close()
    out = {}
    for member in members:
        instance = (member.get("group_instance_id") or "").removeprefix(filter_instance_prefix(cfg))
        assignment = member.get("member_assignment") or {}
        held = [p for tp in assignment.get("assigned_partitions", []) for p in tp["partitions"]]
        out[instance] = sum(lag.get(str(p), 0) for p in held)
    return out
