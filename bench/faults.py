"""Fault injection: kill -9 the roles of a running `tba run` job at random times under a steady load of
groups, let the supervisor restart them (the broker on its own data dir), then check from the topics,
read from the start, that nothing acked was lost and nothing was admitted twice.

    python bench/faults.py [--kills 20] [--interval-s 6]  ->  bench/results/faults.json

Roles killed: the searcher, each filter, the trainer (which hosts the weight-sync service, so that
is killed with it) and the broker. A filter transaction the broker's kill -9 leaves hanging is
ended by the supervisor as its coordinator decided (`hanging_transactions_healed`); `hanging_transactions_left`
must be empty, and no group may be routed twice.
The job uses a tiny random model and the toy task: the point is the data path, not learning. The
check itself lives in tests/fault_injection.py, which tests/test_faults.py runs in a short version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault_injection import run_faults, tiny_job  # noqa: E402


def main() -> None:
    from bench.results import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--interval-s", type=float, default=6.0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/faults.json"))
    parser.add_argument("--keep", default=None, help="Keep the job's directory (logs, run dir, broker data) here.")
    args = parser.parse_args()
    with tiny_job(args.keep) as cfg:
        result = run_faults(cfg, args.kills, args.interval_s)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
