"""Preference-tuning smoke benchmark: `tba run configs/sentiment.yaml` for a fixed wall budget on this
machine (the embedded SmolLM2-135M-Instruct, everyday prompts that ship in configs/prompts/, VADER
sentiment as the reward, TBA asynchronous), and the held-out reward before and after.

    python bench/preference_smoke.py [--budget-s 720] [--samples 4]  ->  bench/results/preference_smoke.json

The held-out reward is the mean reward of --samples completions of every held-out prompt, sampled
at the training temperature and scored exactly as in training (the -1 for a completion that never
ends included), for the initial policy and the final checkpoint: the same prompts, the same seed.
TBA__SECTION__FIELD variables set change the config as they would for `tba run`, and are recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning_smoke import job_config, overrides, run_tba  # noqa: E402
from bench.results import write_results  # noqa: E402
from ops.config import TbaConfig, with_overrides  # noqa: E402
from trainer.job import checkpoint_policy  # noqa: E402


def held_out_groups(cfg: TbaConfig, model, tokenizer, task, samples: int, seed: int = 0) -> list[list]:
    """samples completions of every held-out prompt at the sampling temperature, scored as in training."""
    from policy.generation import HFGenerator
    from policy.tasks import scored_samples

    torch.manual_seed(seed)
    generator = HFGenerator(model.eval(), tokenizer, model, cfg.searcher.temperature, cfg.searcher.max_new_tokens)
    out = []
    for start in range(0, len(task.held_out), 8):
        problems = task.held_out[start : start + 8]
        prompts = [generator.prompt_ids(p.messages) for p in problems]
        for problem, completions in zip(problems, generator.sample(prompts, samples), strict=True):
            out.append(scored_samples(task, problem, completions))
    return out


def mean_reward(groups: list[list]) -> float:
    return float(np.mean([s.reward for g in groups for s in g]))


def smoke(config: str, budget_s: float, samples: int, measure, eval_prompts: int | None = None) -> dict:
    """Run the job at config for budget_s; measure(cfg, model, tokenizer, task) before and after.

    eval_prompts: fewer held-out prompts for the job's own evaluation at step 0 (measure is what counts)."""
    from policy.models import load_model
    from policy.tasks import build_task

    with tempfile.TemporaryDirectory() as tmp:
        trainer = {"eval_every": 1_000_000, **({"eval_prompts": eval_prompts} if eval_prompts else {})}
        cfg = job_config(Path(tmp), budget_s, str(ROOT / config), trainer=trainer)
        cfg = with_overrides(cfg, task={"prompts_file": str(ROOT / cfg.task.prompts_file)})
        task = build_task(cfg.task)
        model, tokenizer = load_model(cfg.searcher.model)
        start = measure(cfg, model, tokenizer, task)
        run = run_tba(cfg)
        trainer, tokenizer = checkpoint_policy(cfg)
        end = measure(cfg, trainer.model, tokenizer, task)
    train = [r for r in run["rows"] if r["kind"] == "train"]
    return {
        "model": "SmolLM2-135M-Instruct",
        "config": config,
        "overrides": overrides(),
        "budget_s": budget_s,
        "wall_s": run["wall_s"],
        "steps": train[-1]["step"] if train else 0,
        "policy_versions": train[-1]["policy_version"] if train else 0,
        "held_out_prompts": len(task.held_out),
        "samples_per_prompt": samples,
        "start": start,
        "end": end,
        "groups_generated": len(run["groups"]),
        "train_mean_reward_first_10": float(np.mean([r["mean_reward"] for r in train[:10]])) if train else None,
        "train_mean_reward_last_10": float(np.mean([r["mean_reward"] for r in train[-10:]])) if train else None,
        "machine": f"{os.cpu_count()} cores, CPU only",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=720)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench/results/preference_smoke.json"))
    args = parser.parse_args()

    def measure(cfg, model, tokenizer, task) -> dict:
        groups = held_out_groups(cfg, model, tokenizer, task, args.samples)
        finished = [s.finish_reason == "stop" for g in groups for s in g]
        return {"reward": mean_reward(groups), "finished_fraction": float(np.mean(finished))}

    result = smoke("configs/sentiment.yaml", args.budget_s, args.samples, measure)
    result.update(
        reward_start=result["start"]["reward"],
        reward_end=result["end"]["reward"],
        reward_gain=result["end"]["reward"] - result["start"]["reward"],
    )
    write_results(args.out, result)


if __name__ == "__main__":
    main()
