"""Learning smoke benchmark: SmolLM2-135M-Instruct on the default arithmetic task, TBA asynchronous,
for a fixed wall budget on this machine, with a held-out greedy evaluation before and after.

    python bench/learning_smoke.py [--budget-s 900]  ->  bench/results/learning_smoke.json

One searcher process and one filter process stream through a fresh local broker to the trainer in
this process (the full path: searcher -> Kafka -> filter -> trainer -> weight sync -> searcher).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import write_results  # noqa: E402
from ops.broker import LocalBroker, free_port  # noqa: E402
from ops.config import load_config  # noqa: E402
from ops.topics import create_topics, read_topic, topic_names  # noqa: E402
from producers.generation import load_model  # noqa: E402
from producers.tasks import build_task  # noqa: E402
from schemas.codec import SchemaStore  # noqa: E402
from schemas.records import TrajectoryCodec  # noqa: E402
from trainer.train import Evaluator, run_trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=900)
    parser.add_argument("--out", default=str(ROOT / "bench/results/learning_smoke.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for the trainer, one for the searcher

    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(Path(tmp) / "kafka", port=free_port(), heap="768m")
        broker.start()
        cfg = load_config(
            environ={},
            kafka={"bootstrap": broker.bootstrap, "namespace": "smoke"},
            task={"eval_size": 64},
            searcher={"samples_per_prompt": 8, "prompts_per_batch": 2, "max_new_tokens": 32, "temperature": 0.7},
            # m = 0.5: with one CPU searcher the newest version holds only a prompt or two
            buffer={"samples_per_prompt": 8, "on_policy_prob": 0.5},
            trainer={"prompts_per_step": 2, "micro_batch_prompts": 1, "lr": 1e-4, "warmup_steps": 2,
                     "beta_start": 0.012, "beta_end": 0.004, "beta_anneal_steps": 40, "sync_every": 1,
                     "min_buffer_prompts": 2, "max_steps": 100_000, "eval_every": 100_000, "checkpoint_every": 100_000,
                     "eval_prompts": 64, "eval_max_new_tokens": 32,
                     "run_dir": str(Path(tmp) / "run")},
            weights={"port": free_port()},
        )  # fmt: skip
        create_topics(cfg)
        _, tokenizer = load_model("")  # the default model (converted once, before the clock starts)
        evaluate = Evaluator(cfg, build_task(cfg.task), tokenizer)

        config = Path(tmp) / "tba.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        tba = [sys.executable, "-m", "ops.cli", "--config", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen([*tba, "filter"], env=env, cwd=ROOT),
            subprocess.Popen([*tba, "search"], env=env, cwd=ROOT),
        ]
        stop = threading.Event()
        timer = threading.Timer(args.budget_s, stop.set)
        started = time.monotonic()
        timer.start()
        try:
            trainer = run_trainer(cfg, stop)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(120)
        wall = time.monotonic() - started
        end_eval = evaluate(trainer.model)

        rows = [json.loads(line) for line in (Path(cfg.trainer.run_dir) / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        start_eval = next(r for r in rows if r["kind"] == "eval" and r["step"] == 0)  # the trainer's own, at step 0
        groups = [TrajectoryCodec(SchemaStore(cfg)).decode(r.value) for r in read_topic(cfg, topic_names(cfg).raw)]
        tokens = sum(s.token_ids.size for g in groups for s in g.samples)
        broker.stop()

    result = {
        "model": "SmolLM2-135M-Instruct",
        "task": f"{cfg.task.dataset} {cfg.task.dataset_args}",
        "budget_s": args.budget_s,
        "wall_s": wall,
        "steps": trainer.step,
        "policy_versions": trainer.policy_version,
        "accuracy_start": start_eval["greedy_accuracy"],
        "accuracy_end": end_eval["greedy_accuracy"],
        "accuracy_gain": end_eval["greedy_accuracy"] - start_eval["greedy_accuracy"],
        "sampled_reward_start": start_eval["sampled_reward"],
        "sampled_reward_end": end_eval["sampled_reward"],
        "eval_problems": cfg.trainer.eval_prompts,
        "groups_generated": len(groups),
        "tokens_per_s": tokens / wall,
        "train_step_s": float(np.mean([r["seconds"] for r in train])) if train else None,
        "train_mean_reward_first_10": float(np.mean([r["mean_reward"] for r in train[:10]])) if train else None,
        "train_mean_reward_last_10": float(np.mean([r["mean_reward"] for r in train[-10:]])) if train else None,
        "trainer_wait_fraction": train[-1]["trainer_wait_fraction"] if train else None,
        "machine": f"{os.cpu_count()} cores, CPU only",
    }
    write_results(args.out, result)


if __name__ == "__main__":
    main()
