"""Every role on its own simulated host (Linux network namespaces, made and removed here; needs root):
the broker, the trainer data-parallel over two hosts (torchrun + gloo), two searchers and a filter.
SASL on Kafka, TLS plus tokens on weight sync; one searcher host is killed -9 midway.

    sudo python bench/multihost.py  ->  bench/results/multihost.json

hosts, steps (optimizer steps), versions_received_min (the fewest policy versions a searcher received
through gRPC), lost (groups a searcher logged as sent that raw lacks; goal 0), and the rest of the
accounting. The job itself lives in tests/multihost.py, which tests/test_multihost.py runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.multihost import run_multihost  # noqa: E402
from tests.netns import missing_requirements  # noqa: E402


def main() -> None:
    from bench.results import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench/results/multihost.json"))
    parser.add_argument("--keep", default=None, help="Keep the job's directory (logs, run dirs, broker data) here.")
    args = parser.parse_args()
    if reason := missing_requirements():
        sys.exit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_results(args.out, run_multihost(work))


if __name__ == "__main__":
    main()
