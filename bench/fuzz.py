"""Fuzzing the filter: malformed messages interleaved with valid groups, through a real broker and a
real filter process. Every malformed message must end in the dlq with a reason, every valid group in
curated, each exactly once, and the filter must neither crash nor stall.

    python bench/fuzz.py [--malformed 10000] [--valid 1000]  ->  bench/results/fuzz.json

tests/test_fuzz.py runs the same function at full size.

The messages and the check live in tests/malformed.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.malformed import fuzz  # noqa: E402


def main() -> None:
    from bench.results import write_results
    from ops.broker import LocalBroker, free_port
    from ops.config import load_config
    from ops.topics import create_topics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malformed", type=int, default=10_000)
    parser.add_argument("--valid", type=int, default=1_000)
    parser.add_argument("--out", default=str(ROOT / "bench/results/fuzz.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp) / "kafka", port=free_port(), heap="768m")
        broker.start()
        try:
            cfg = load_config(environ={}, kafka={"bootstrap": broker.bootstrap, "namespace": "fuzz"})
            create_topics(cfg)
            result = fuzz(cfg, args.malformed, args.valid)
        finally:
            broker.stop()
    write_results(args.out, result)


if __name__ == "__main__":
    main()
