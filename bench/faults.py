"""Fault injection: kill -9 the roles of a running `tba run` job at random times under a steady load of
groups, let the supervisor restart them (the broker on its own data dir), then check from the topics,
read from the start, that nothing acked was lost and nothing was admitted twice.

    python bench/faults.py [--kills 20] [--interval-s 6]  ->  bench/results/faults.json

Roles killed: the searcher, each filter, the trainer (which hosts the weight-sync service, so that
is killed with it) and the broker. A filter transaction the broker's kill -9 leaves hanging is
aborted by the supervisor (`hanging_transactions_healed`); `hanging_transactions_left` must be empty.
The job uses a tiny random model and the toy task: the point is the data path, not learning. The
check itself lives in tests/fault_injection.py, which tests/test_faults.py runs in a short version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.broker import job_broker  # noqa: E402
from tests.fault_injection import job_config, run_faults  # noqa: E402


def main() -> None:
    from bench.results import write_results
    from tests.tiny_models import saved_tiny_llama

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--interval-s", type=float, default=6.0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/faults.json"))
    parser.add_argument("--keep", default=None, help="Keep the job's directory (logs, run dir, broker data) here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        cfg = job_config(Path(tmp), saved_tiny_llama(Path(tmp) / "model"))
        try:
            result = run_faults(cfg, args.kills, args.interval_s)
        finally:
            job_broker(cfg).stop()
    write_results(args.out, result)


if __name__ == "__main__":
    main()
