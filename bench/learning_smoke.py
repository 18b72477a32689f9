"""Learning smoke benchmark: `tba run` on the embedded defaults (SmolLM2-135M-Instruct, the default
arithmetic task, TBA asynchronous) for a fixed wall budget on this machine, held-out greedy
accuracy at the start and of the final checkpoint.

    python bench/learning_smoke.py [--budget-s 1200] [--eval-problems 192]  ->  bench/results/learning_smoke.json

Any TBA__SECTION__FIELD variables set (e.g. TBA__TRAINER__BETA_START=0.1) change the defaults as they
would for `tba run`, and are recorded in the results.

The job runs exactly as a user's would: the supervisor starts a fresh broker of its own, the trainer
(hosting weight sync), one searcher and one filter process, and stops them in order at the budget.
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

from bench.results import write_results  # noqa: E402
from ops.broker import free_port, job_broker  # noqa: E402
from ops.config import ENV_PREFIX, TbaConfig, load_config, with_overrides  # noqa: E402
from ops.metrics import metric_rows, paired_gain  # noqa: E402
from ops.topics import JobTopics  # noqa: E402
from tba.signals import Stop  # noqa: E402
from tba.supervisor import run_job  # noqa: E402
from trainer.job import evaluate_at_stop  # noqa: E402


def job_config(tmp: Path, budget_s: float, path: str | None = None, **sections) -> TbaConfig:
    """The embedded defaults, or the config file at path (and any TBA__ variables set), on a broker and
    ports of their own, for budget_s."""
    port = free_port()
    return load_config(
        path,
        kafka={"bootstrap": f"127.0.0.1:{port}", "namespace": "bench"},
        broker={"port": port, "data_dir": str(tmp / "kafka"), "heap": "768m"},
        weights={"port": free_port()},
        run={"budget_s": budget_s, "live_view": False, "metrics_port": 0},
        **{**sections, "trainer": {"run_dir": str(tmp / "run"), **sections.get("trainer", {})}},
    )


def overrides() -> dict[str, str]:
    """The TBA__SECTION__FIELD variables in effect: what differs from the embedded defaults."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIX)}


def run_tba(cfg: TbaConfig) -> dict:
    """`tba run` for cfg.run.budget_s; the trainer's metrics rows, the final evaluation, what was generated."""
    from policy.models import load_model

    load_model("")  # the default model converted once, before the clock starts
    started = time.monotonic()
    run_job(with_overrides(cfg, run={"keep_broker": True}), Stop())  # its topics are read below
    wall = time.monotonic() - started
    rows = metric_rows(Path(cfg.trainer.run_dir))
    end_eval = evaluate_at_stop(cfg) or [r for r in rows if r["kind"] == "eval"][-1]  # as `tba run` evaluates
    raw = JobTopics(cfg).raw
    groups = [raw.codec.decode(r.value) for r in raw.read()]
    job_broker(cfg).stop()
    return {"wall_s": wall, "rows": rows, "end_eval": end_eval, "groups": groups}


def smoke(tmp: Path, budget_s: float, eval_problems: int, **sections) -> dict:
    """The default job (sections changed, e.g. buffer={"max_replay_ratio": 2}) for budget_s in tmp; what it did
    and learned. Evaluations at the start and of the final checkpoint only, on more problems: less noise."""
    trainer = {"eval_prompts": eval_problems, "eval_every": 1_000_000, **sections.pop("trainer", {})}
    cfg = job_config(tmp, budget_s, task={"eval_size": eval_problems}, trainer=trainer, **sections)
    run = run_tba(cfg)
    rows, end_eval = run["rows"], run["end_eval"]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    tokens = sum(s.token_ids.size for g in run["groups"] for s in g.samples)
    gain, gain_se = paired_gain(evals[0], end_eval)
    return {
        "model": "SmolLM2-135M-Instruct",
        "task": f"{cfg.task.dataset} {cfg.task.dataset_args}",
        "config": "embedded defaults",
        "overrides": overrides(),
        "changed": sections,
        "max_replay_ratio": cfg.buffer.max_replay_ratio,
        "budget_s": budget_s,
        "wall_s": run["wall_s"],
        "steps": train[-1]["step"] if train else 0,
        "policy_versions": train[-1]["policy_version"] if train else 0,
        "accuracy_start": evals[0]["greedy_accuracy"],
        "accuracy_end": end_eval["greedy_accuracy"],
        "accuracy_gain": gain,
        "accuracy_gain_se": gain_se,  # paired over the same problems (ops/metrics.py: paired_gain)
        "accuracy_end_se": end_eval["greedy_accuracy_se"],
        "sampled_reward_start": evals[0]["sampled_reward"],
        "sampled_reward_end": end_eval["sampled_reward"],
        "sampled_reward_end_se": end_eval["sampled_reward_se"],
        "eval_problems": cfg.trainer.eval_prompts,
        "groups_generated": len(run["groups"]),
        "tokens_per_s": tokens / run["wall_s"],
        "replay_ratio": train[-1]["replay_ratio"] if train else None,
        "mean_staleness": float(np.mean([r["staleness"] for r in train])) if train else None,
        "train_step_s": float(np.mean([r["seconds"] for r in train])) if train else None,
        "train_mean_reward_first_10": float(np.mean([r["mean_reward"] for r in train[:10]])) if train else None,
        "train_mean_reward_last_10": float(np.mean([r["mean_reward"] for r in train[-10:]])) if train else None,
        "trainer_wait_fraction": train[-1]["trainer_wait_fraction"] if train else None,
        "machine": f"{os.cpu_count()} cores, CPU only",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=1200)
    parser.add_argument("--eval-problems", type=int, default=192)
    parser.add_argument("--out", default=str(ROOT / "bench/results/learning_smoke.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_results(args.out, smoke(Path(tmp), args.budget_s, args.eval_problems))


if __name__ == "__main__":
    main()
