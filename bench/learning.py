"""Head-to-head learning benchmark: held-out accuracy against wall time on this machine, for
(a) tba-stream TBA asynchronous (`tba run`: searcher, filter and trainer as separate processes),
(b) tba-stream's synchronous on-policy baseline (generate, then train; GRPO advantages; no Kafka),
(b') the same synchronous loop with TBA's objective (sync_tb): objective and asynchrony apart,
(c) TRL's GRPOTrainer set as close to (b) as it allows.
Same model (SmolLM2-135M-Instruct), task, prompts, reward, evaluation, learning rate, batch (B prompts
x K samples), temperature, completion length and wall budget; every evaluation counts in the budget.

    python bench/learning.py [--budget-s 900] [--seeds 0 1 2] [--systems tba sync trl] [--keep]
        ->  bench/results/learning.json, bench/results/learning.png

TBA__SECTION__FIELD variables set change every system's configuration alike, and are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.learning_smoke import job_config, overrides, run_tba  # noqa: E402
from bench.results import measured_commit, write_results  # noqa: E402
from ops.config import TbaConfig, with_overrides  # noqa: E402
from ops.metrics import metric_rows  # noqa: E402


def _seeded(cfg: TbaConfig, seed: int) -> TbaConfig:
    # the task's seed (prompts, held-out split) stays fixed: only sampling and training vary
    return with_overrides(cfg, trainer={"seed": seed}, searcher={"seed": seed})


def tba_async(tmp: Path, budget_s: float, seed: int, **sections) -> tuple[list[dict], dict]:
    cfg = _seeded(job_config(tmp, budget_s, **sections), seed)
    started = time.time()
    run = run_tba(cfg)
    points = [_point(r["time"] - started, r) for r in run["rows"] if r["kind"] == "eval"]
    train = [r for r in run["rows"] if r["kind"] == "train"]
    extra = {"trainer_wait_fraction": train[-1]["trainer_wait_fraction"] if train else None}
    return points + [_point(run["wall_s"], run["end_eval"])], extra


def tba_sync(tmp: Path, budget_s: float, seed: int, loss: str = "grpo", **sections) -> tuple[list[dict], dict]:
    from policy.models import load_model
    from policy.tasks import build_task
    from trainer.evaluation import Evaluator
    from trainer.job import run_trainer

    trainer = {**sections.pop("trainer", {}), "mode": "sync", "loss": loss}
    cfg = _seeded(job_config(tmp, budget_s, trainer=trainer, **sections), seed)
    torch.set_num_threads(os.cpu_count() or 1)
    stop = threading.Event()
    timer = threading.Timer(budget_s, stop.set)
    started = time.time()
    timer.start()
    trainer = run_trainer(cfg, stop, history=False)  # no Kafka: the baseline as plain as it gets
    timer.cancel()
    wall = time.time() - started
    _, tokenizer = load_model("")
    end = Evaluator(cfg, build_task(cfg.task), tokenizer)(trainer.model)
    rows = metric_rows(Path(cfg.trainer.run_dir))
    return [_point(r["time"] - started, r) for r in rows if r["kind"] == "eval"] + [_point(wall, end)], {}


def trl_grpo(tmp: Path, budget_s: float, seed: int, **sections) -> tuple[list[dict], dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policy.models import load_model
    from policy.tasks import build_task
    from trainer.evaluation import Evaluator

    cfg = job_config(tmp, budget_s, **sections)
    s, t, k = cfg.searcher, cfg.trainer, cfg.buffer.samples_per_prompt
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()
    model, tokenizer = load_model("")
    task = build_task(cfg.task)
    evaluate = Evaluator(cfg, task, tokenizer)
    problems = task.train
    data = Dataset.from_list([{"prompt": list(p.messages), "index": i} for i, p in enumerate(problems)])

    def reward(prompts, completions, index, **_):
        return [task.score(problems[i], [c[-1]["content"]], [True])[0] for c, i in zip(completions, index, strict=True)]

    points = [_point(time.time() - started, evaluate(model))]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **_):
            if state.global_step % t.eval_every == 0:
                points.append(_point(time.time() - started, evaluate(model)))
            if time.time() - started >= budget_s:
                control.should_training_stop = True

    args = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=not torch.cuda.is_available(), seed=seed, report_to="none",
        save_strategy="no", logging_steps=1,
        learning_rate=t.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm, per_device_train_batch_size=t.prompts_per_step * k, num_generations=k,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0,
        beta=0.0, loss_type="grpo", max_steps=1_000_000, disable_dropout=True,
    )  # fmt: skip
    lora = None
    if t.lora_r:  # the same adapters as (a) and (b)
        from peft import LoraConfig

        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=0.0, target_modules=list(t.lora_targets))
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tokenizer,
        callbacks=[Clock()], peft_config=lora,
    )  # fmt: skip
    trainer.train()
    return points + [_point(time.time() - started, evaluate(model))], {}


# sync_tb: the synchronous loop with TBA's objective, so that objective and asynchrony can be told apart
SYSTEMS = {"tba": tba_async, "sync": tba_sync, "sync_tb": partial(tba_sync, loss="tb"), "trl": trl_grpo}


def _point(t: float, evaluation: dict) -> dict:
    return {"t_s": float(t), "greedy_accuracy": evaluation["greedy_accuracy"],
            "sampled_reward": evaluation["sampled_reward"]}  # fmt: skip


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["t_s"] for p in points if p["greedy_accuracy"] >= target), None)


def mean_of(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def summarise(runs: dict[str, list[dict]], target_gain: float) -> dict:
    start = float(np.mean([r["points"][0]["greedy_accuracy"] for rs in runs.values() for r in rs]))
    target = start + target_gain
    table = {}
    for name, rs in runs.items():
        finals = [r["points"][-1]["greedy_accuracy"] for r in rs]
        reach = [time_to(r["points"], target) for r in rs]
        table[name] = {
            "final_accuracy_mean": float(np.mean(finals)),
            "final_accuracy_spread": [float(min(finals)), float(max(finals))],
            "time_to_target_s": reach,
            "time_to_target_s_mean": float(np.mean(reach)) if all(x is not None for x in reach) else None,
            **{k: mean_of([r["extra"].get(k) for r in rs]) for k in rs[0]["extra"]},  # over seeds
        }

    def speedup(other: str) -> float | None:
        if other not in table or "tba" not in table:
            return None
        a, b = table["tba"]["time_to_target_s_mean"], table[other]["time_to_target_s_mean"]
        return b / a if a and b else None

    tba = runs.get("tba", [])
    within = [max((p["greedy_accuracy"] for p in r["points"] if p["t_s"] <= 1800), default=0.0) for r in tba]
    return {
        "start_accuracy_mean": start,
        "target_accuracy": target,
        "systems": table,
        "speedup_vs_trl": speedup("trl"),
        "speedup_vs_sync": speedup("sync"),
        "accuracy_gain_30min": float(np.mean(within) - start) if tba else None,
    }


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, rs), color in zip(runs.items(), ("C0", "C1", "C3", "C2"), strict=False):
        for i, r in enumerate(rs):
            ts = [p["t_s"] / 60 for p in r["points"]]
            ax.plot(ts, [p["greedy_accuracy"] for p in r["points"]], "o-", color=color, alpha=0.8,
                    label=name if i == 0 else None)  # fmt: skip
    ax.set(xlabel="wall time (min)", ylabel="held-out greedy accuracy", title="SmolLM2-135M, basic_arithmetic, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def kept_runs(path: Path, systems: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """The runs in the results at path that this invocation does not repeat, each stamped with what it ran."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    ran = {"commit": old["commit"], "overrides": old.get("overrides", {})}
    return {name: [{**ran, **r} for r in rs if name not in systems or r["seed"] not in seeds]
            for name, rs in old["runs"].items()}  # fmt: skip


def machine() -> str:
    if torch.cuda.is_available():
        return f"{os.cpu_count()} cores, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} cores, CPU only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=900)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--target-gain", type=float, default=0.05, help="target = mean start accuracy + this")
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=40, help="steps between evaluations")
    parser.add_argument("--config", default=None, help="a config file (e.g. configs/math.yaml); default: embedded")
    parser.add_argument("--out", default=str(ROOT / "bench/results/learning.json"))
    parser.add_argument("--keep", action="store_true", help="keep out's runs of other systems and seeds (a seed added "
                        "to a system, or a system re-run on new code): each run records the commit it ran")  # fmt: skip
    args = parser.parse_args()

    kept = kept_runs(Path(args.out), args.systems, args.seeds) if args.keep else {}
    runs = {name: [] for name in args.systems} | kept
    evaluation = {"path": args.config, "task": {"eval_size": args.eval_problems},
                  "trainer": {"eval_prompts": args.eval_problems, "eval_every": args.eval_every}}  # fmt: skip
    ran = {"commit": measured_commit(), "overrides": overrides()}  # what every run of this invocation ran
    for seed in args.seeds:
        for name in args.systems:
            with tempfile.TemporaryDirectory() as tmp:
                points, extra = SYSTEMS[name](Path(tmp), args.budget_s, seed, **evaluation)
            runs[name].append({"seed": seed, **ran, "points": points, "extra": extra})
            print(f"{name} seed {seed}: " + ", ".join(f"{p['t_s']:.0f}s {p['greedy_accuracy']:.3f}" for p in points))
    plot(runs, Path(args.out).with_suffix(".png"))
    write_results(
        args.out,
        {
            "model": "SmolLM2-135M-Instruct",
            "budget_s": args.budget_s,
            "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
            "overrides": ran["overrides"],
            "config": args.config or "embedded defaults",
            "machine": machine(),
            **summarise(runs, args.target_gain),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
