"""How often the trainer may reuse the history (buffer.max_replay_ratio: prompts trained per group received), side
by side on the default job: bench/learning_smoke.py's 12-minute `tba run` once per bound, one after the other
(each job has the machine to itself), the same held-out problems at the start and of the final checkpoint.

    python bench/replay_ratio.py [--ratios 0 1 2] [--budget-s 720]  ->  bench/results/replay_ratio.json

0 is no bound (the trainer draws as fast as it steps). The run of the embedded default is also written as
bench/results/learning_smoke.json: it is the default job's learning smoke.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning_smoke import smoke  # noqa: E402
from bench.results import write_results  # noqa: E402
from ops.config import BufferConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--budget-s", type=float, default=720)
    parser.add_argument("--eval-problems", type=int, default=256)
    args = parser.parse_args()
    default = BufferConfig().max_replay_ratio
    runs = []
    for ratio in args.ratios:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(smoke(Path(tmp), args.budget_s, args.eval_problems, buffer={"max_replay_ratio": ratio}))
        if ratio == default:
            write_results(ROOT / "bench/results/learning_smoke.json", runs[-1])
    write_results(ROOT / "bench/results/replay_ratio.json", {
        "what": "the default job for budget_s once per buffer.max_replay_ratio (0: no bound), in turn",
        "default": default,
        "budget_s": args.budget_s,
        "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
