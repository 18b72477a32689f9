"""`tba report RUN_DIR`: plots and a markdown summary of a run, from what the run left on disk.

Reads run_dir/metrics.jsonl (the trainer's steps and evaluations), job.json (the supervised
processes) and inspect.json (topics and dead letters, written when `tba run` stops).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ops.errors import TbaError  # noqa: E402
from ops.metrics import metric_rows, paired_gain  # noqa: E402


def load_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The train and eval rows of run_dir/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise TbaError(f"{path} does not exist: is {run_dir} a trainer run directory (trainer.run_dir)?")
    rows = metric_rows(run_dir)
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def _minutes_since(rows: list[dict], t0: float) -> np.ndarray:
    return np.array([(r["time"] - t0) / 60 for r in rows])


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write learning.png, throughput.png, staleness.png, rejects.png (when known) and report.md."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    train, evals = load_rows(run_dir)
    if not train and not evals:
        raise TbaError(f"{run_dir}/metrics.jsonl holds no steps yet")
    t0 = min(r["time"] - r["wall_s"] for r in train + evals)  # wall time of the first start
    figures = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (x_of, label) in enumerate(((lambda rows: _minutes_since(rows, t0), "wall time (min)"),
                                         (lambda rows: np.array([r["step"] for r in rows]), "step"))):  # fmt: skip
        if train:
            axes[0, col].plot(x_of(train), [r["mean_reward"] for r in train], ".", alpha=0.4, label="batch")
            axes[0, col].plot(x_of(train), _smooth([r["mean_reward"] for r in train]), label="smoothed")
        axes[0, col].set(xlabel=label, ylabel="training reward")
        axes[0, col].legend()
        if evals:
            axes[1, col].plot(x_of(evals), [r["greedy_accuracy"] for r in evals], "o-", label="greedy accuracy")
            axes[1, col].plot(x_of(evals), [r["sampled_reward"] for r in evals], "s--", label="sampled reward")
        axes[1, col].set(xlabel=label, ylabel="held-out")
        axes[1, col].legend()
    figures.append(_save(fig, out / "learning.png"))

    if train:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        minutes = _minutes_since(train, t0)
        axes[0].plot(minutes[1:], 60 / np.maximum(np.diff([r["time"] for r in train]), 1e-9), ".")
        axes[0].set(xlabel="wall time (min)", ylabel="steps / min")
        axes[1].plot(minutes, [r.get("trainer_wait_fraction", 0.0) for r in train])
        axes[1].set(xlabel="wall time (min)", ylabel="trainer wait fraction")
        figures.append(_save(fig, out / "throughput.png"))

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.hist([r["staleness"] for r in train], bins=20)
        ax.set(xlabel="mean staleness of a batch (policy versions)", ylabel="steps")
        figures.append(_save(fig, out / "staleness.png"))

    inspect_path = run_dir / "inspect.json"
    inspected = json.loads(inspect_path.read_text()) if inspect_path.exists() else None
    if inspected and inspected["dlq_by_scorer"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        scorers = list(inspected["dlq_by_scorer"])
        ax.barh(scorers, [inspected["dlq_by_scorer"][s]["records"] for s in scorers])
        ax.set(xlabel="dead letters", title="filter rejects by scorer")
        figures.append(_save(fig, out / "rejects.png"))

    (out / "report.md").write_text(_summary(run_dir, train, evals, inspected, figures))
    return out


def _smooth(values: list[float], window: int = 10) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _headline(first: dict, last: dict) -> list[str]:
    """First and last held-out evaluation with their standard errors, and whether the gain stands out of the
    noise (two standard errors, problem by problem) or not."""
    pm = lambda row, key: f"{row[key]:.3f} ± {row.get(key + '_se', float('nan')):.3f}"  # noqa: E731
    stopped = ", the policy the job stopped with" if last.get("at_stop") else ""
    steps = f"(step {first['step']} -> {last['step']}{stopped}, {last.get('eval_problems', '?')} problems)"
    if "greedy_solved" in first and "greedy_solved" in last:
        gain, se = paired_gain(first, last)
        verdict = "beyond" if abs(gain) > 2 * se else "within"
        change = f"gain {gain:+.3f} ± {se:.3f}: {verdict} the noise (two standard errors)"
    else:  # rows of an older run: no per-problem results to pair
        change = f"gain {last['greedy_accuracy'] - first['greedy_accuracy']:+.3f}"
    return [
        f"- held-out greedy accuracy {steps}: {pm(first, 'greedy_accuracy')} -> {pm(last, 'greedy_accuracy')}, "
        f"{change}",
        f"- held-out sampled reward: {pm(first, 'sampled_reward')} -> {pm(last, 'sampled_reward')}",
    ]


def _summary(run_dir: Path, train: list[dict], evals: list[dict], inspected: dict | None, figures) -> str:
    lines = [f"# Run report: {run_dir}", ""]
    if train:
        last = train[-1]
        lines += [
            f"- steps: {last['step']}, policy version {last['policy_version']}, "
            f"wall time of the last start {last['wall_s'] / 60:.1f} min",
            f"- mean step: {np.mean([r['seconds'] for r in train]):.2f} s; "
            f"trainer wait fraction at the end: {last.get('trainer_wait_fraction', 0.0):.3f}",
            f"- training reward: first 10 steps {np.mean([r['mean_reward'] for r in train[:10]]):.3f}, "
            f"last 10 steps {np.mean([r['mean_reward'] for r in train[-10:]]):.3f}",
            f"- mean staleness: {np.mean([r['staleness'] for r in train]):.2f} policy versions; replay ratio at the "
            f"end: {last.get('replay_ratio', float('nan')):.2f} prompts trained per group received",
        ]
    if evals:
        first, last = evals[0], evals[-1]
        lines += [*_headline(first, last), ""]
        lines += [
            "| step | policy version | greedy accuracy | sampled reward |",
            "|---|---|---|---|",
            *(
                f"| {r['step']} | {r['policy_version']} | {r['greedy_accuracy']:.3f} | {r['sampled_reward']:.3f} |"
                for r in evals
            ),  # fmt: skip
        ]
    if inspected:
        lines += ["", "| topic | end offset |", "|---|---|"]
        lines += [f"| {t['topic']} | {t['end_offsets']} |" for t in inspected["topics"]]
        if inspected["dlq_by_scorer"]:
            lines += ["", "| rejected by | records | example reason |", "|---|---|---|"]
            lines += [f"| {k} | {v['records']} | {v['example']} |" for k, v in inspected["dlq_by_scorer"].items()]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in figures), ""]
    return "\n".join(lines)
