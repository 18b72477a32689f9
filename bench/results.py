"""Where benchmark results go: bench/results/<name>.json, stamped with the commit measured, and a copy on stdout."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measured_commit() -> str:
    """HEAD's hash, with '+changes' when the working tree differs from it (what ran is then not HEAD alone);
    results files that earlier benchmarks rewrote do not count: they are not what runs."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    status = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"]
    dirty = subprocess.run(status, capture_output=True, text=True)
    return head + ("+changes" if dirty.stdout.strip() else "")


def write_results(out: str | Path, result: dict) -> None:
    result = {"commit": measured_commit(), **result}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
