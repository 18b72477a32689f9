"""Network faults on a running job, every role on its own simulated host (Linux network namespaces, made
and removed here; needs root, iproute2 and tc): each role's host cut off (its cable pulled) for 60 s, the
weight service cut off from one searcher, a searcher's link throttled to 1 mbit, the broker frozen (SIGSTOP).

    sudo python bench/faults_network.py  ->  bench/results/faults_network.json

Per case: what was done and for how long (fault, fault_s), lost (groups a searcher logged as sent that raw
lacks; goal 0), duplicated (duplicates in raw plus groups routed twice; goal 0), recovery_s (from the heal
to each role's first progress: a batch sent, a filter commit, a trainer step, a weight version received;
goal <= 30), stop_s (a role SIGTERMed while the fault is on again, against its stop timeout limit_s), and
roles that exited by themselves meanwhile (started again, as their supervisor would). final: the accounting
once the searchers have stopped and the filter has routed everything. The harness is tests/network_faults.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netns import missing_requirements  # noqa: E402
from tests.network_faults import run_network_faults  # noqa: E402

CASES = ["searcher_cut", "filter_cut", "trainer_cut", "weights_cut", "searcher_throttled", "broker_frozen"]


def main() -> None:
    from bench.results import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/faults_network.json"))
    parser.add_argument("--fault-s", type=float, default=60.0, help="How long each fault lasts.")
    parser.add_argument("--cases", default=",".join(CASES), help="Which, in this order (comma-separated).")
    parser.add_argument("--keep", default=None, help="Keep the job's directory (logs, run dir, broker data) here.")
    args = parser.parse_args()
    if reason := missing_requirements() or (shutil.which("tc") is None and "throttling needs `tc` (iproute2)"):
        sys.exit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_results(args.out, run_network_faults(work, args.cases.split(","), args.fault_s))


if __name__ == "__main__":
    main()
