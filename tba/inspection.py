"""`tba inspect`: what a running (or finished) job's topics hold, read from Kafka alone."""

from __future__ import annotations

from collections import Counter, defaultdict

from ops import kafka_clients
from ops.config import TbaConfig
from ops.errors import DecodeError
from ops.names import filter_group
from ops.topics import JobTopics, describe_topics


def filter_lag(cfg: TbaConfig) -> dict[str, int]:
    """Per raw partition: records the filter group has not committed yet."""
    group, raw = filter_group(cfg), JobTopics(cfg).raw
    admin = kafka_clients.admin(cfg)
    consumer = raw.consumer()
    try:
        parts = raw.partitions_in(consumer)
        ends = consumer.end_offsets(parts)
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        return {
            str(tp.partition): ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
            for tp in parts
        }
    finally:
        consumer.close()
        admin.close()


def inspect_job(cfg: TbaConfig, scan: int = 10_000) -> dict:
    """Topics and end offsets, filter lag, curated groups and mean reward per policy version (the last
    `scan` records of each partition), dead letters by scorer with an example reason, announced versions."""
    topics = JobTopics(cfg)
    groups, rewards = Counter(), defaultdict(list)
    for _, group in topics.curated.decoded(topics.curated.read(scan)):
        if not isinstance(group, DecodeError):
            groups[group.policy_version] += 1
            rewards[group.policy_version].extend(s.reward for s in group.samples)
    letters, examples = Counter(), {}
    for rec, letter in topics.dlq.decoded(topics.dlq.read(scan)):
        if isinstance(letter, DecodeError):  # someone else's bytes in the dlq
            scorer, reason = "undecodable letter", f"{rec.partition}:{rec.offset}: {letter}"
        else:
            scorer, reason = letter.scorer, letter.reason
        letters[scorer] += 1
        examples.setdefault(scorer, reason)
    announced = [
        v for _, v in topics.policy_versions.decoded(topics.policy_versions.read()) if not isinstance(v, DecodeError)
    ]
    return {
        "topics": describe_topics(cfg),
        "filter_lag": filter_lag(cfg),
        "curated_by_policy_version": {
            str(v): {"groups": groups[v], "mean_reward": sum(rewards[v]) / max(1, len(rewards[v]))}
            for v in sorted(groups)
        },
        "dlq_by_scorer": {k: {"records": n, "example": examples[k]} for k, n in letters.most_common()},
        "policy_versions": [{k: a[k] for k in ("version", "step", "sha256", "published_at")} for a in announced[-5:]],
    }


def print_tables(report: dict, console=None) -> None:
    """`tba inspect` without --json: the report as tables that read at 80 columns. A first column (a topic,
    a scorer) is never cut and the others wrap; a topic's figures and settings share one cell, and a
    checksum shows its first 12 digits (--json has it whole)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    topics = [{"topic": r["topic"], "figures and settings": ", ".join(f"{k} {v}" for k, v in r.items() if k != "topic")}
              for r in report["topics"]]  # fmt: skip
    for title, rows in (
        ("topics", topics),
        ("filter lag", [{"raw partition": p, "records": n} for p, n in report["filter_lag"].items()]),
        (
            "curated groups by policy version",
            [{"version": v, **x} for v, x in report["curated_by_policy_version"].items()],
        ),
        ("dead letters by scorer", [{"scorer": k, **x} for k, x in report["dlq_by_scorer"].items()]),
        ("announced policy versions", [{**v, "sha256": v["sha256"][:12]} for v in report["policy_versions"]]),
    ):
        table = Table(title=title)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for i, column in enumerate(columns):
            table.add_column(column, no_wrap=i == 0, overflow="fold")
        for row in rows:
            table.add_row(
                *(f"{row.get(c, ''):.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns)
            )
        console.print(table)
