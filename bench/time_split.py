"""Where the default job's time goes: `tba run` on the embedded defaults for the budget with every role under
cProfile (TBA_PROFILE_DIR, tba/profiling.py), then the seconds of each phase of the searcher's batches and the
trainer's steps, and what the trainer did meanwhile (replay ratio, staleness).

    python bench/time_split.py [--budget-s 720]  ->  bench/results/time_split.json

Each phase: seconds in all, calls, seconds per searcher batch or trainer step, and its share of the role's
profiled time (the process's main thread from start to stop; a phase inside another counts in both).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning_smoke import job_config  # noqa: E402
from bench.results import write_results  # noqa: E402
from ops.metrics import metric_rows  # noqa: E402
from tba.profiling import PROFILE_DIR_ENV, time_split  # noqa: E402
from tba.signals import Stop  # noqa: E402
from tba.supervisor import run_job  # noqa: E402


def role_summary(split: dict, units: int, unit: str, plural: str) -> dict:
    """One role's split as read: per phase its seconds, calls, seconds per unit (a batch, a step) and share."""
    phases = {
        name: {
            "seconds": round(p["seconds"], 2),
            "calls": p["calls"],
            f"per_{unit}_s": round(p["seconds"] / max(1, units), 3),
            "share": round(p["seconds"] / split["seconds"], 3),
        }
        for name, p in split["phases"].items()
    }
    return {"profiled_s": round(split["seconds"], 1), plural: units, "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=720)
    parser.add_argument("--out", default=str(ROOT / "bench/results/time_split.json"))
    args = parser.parse_args()

    from policy.models import load_model

    load_model("")  # the default model converted once, before the clock starts
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = job_config(Path(tmp), args.budget_s)
        os.environ[PROFILE_DIR_ENV] = str(Path(tmp) / "profiles")  # every role the supervisor starts inherits it
        started = time.monotonic()
        run_job(cfg, Stop())
        wall = time.monotonic() - started
        splits = {s["role"]: s for s in map(time_split, (Path(tmp) / "profiles").glob("*.pstats"))}
        train = [r for r in metric_rows(Path(cfg.trainer.run_dir)) if r["kind"] == "train"]
    missing = {"searcher", "trainer"} - splits.keys()
    if missing:  # a role killed at the stop (past its stop timeout) writes no profile
        raise SystemExit(f"no profile of the {' or '.join(sorted(missing))}: killed at the stop, or never started")
    searcher, trainer = splits["searcher"], splits["trainer"]
    write_results(
        args.out,
        {
            "what": "tba run, embedded defaults (one searcher, one filter, the trainer), every role under cProfile",
            "machine": f"{os.cpu_count()} cores, CPU only",
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "budget_s": args.budget_s,
            "wall_s": round(wall, 1),
            "steps": len(train),
            "groups_generated": searcher["phases"]["kafka_send"]["calls"],
            "replay_ratio": train[-1]["replay_ratio"] if train else None,
            "mean_staleness": float(np.mean([r["staleness"] for r in train])) if train else None,
            "trainer_wait_fraction": train[-1]["trainer_wait_fraction"] if train else None,
            # a batch that generated (Searcher.step also returns at once while it holds no prompts)
            "searcher": role_summary(searcher, searcher["phases"]["generation"]["calls"], "batch", "batches"),
            "trainer": role_summary(trainer, trainer["phases"]["step"]["calls"], "step", "steps"),
        },
    )


if __name__ == "__main__":
    main()
