"""Where benchmark results go: bench/results/<name>.json, and a copy on stdout."""

import json
from pathlib import Path


def write_results(out: str | Path, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
