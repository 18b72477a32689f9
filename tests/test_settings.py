"""Every setting end to end, in both modes: for each task (math, toy, preference, redteam) and mode
(async, sync), `tba run` on the real broker with tiny models produces curated groups, makes two
optimizer steps, checkpoints and stops by itself, and `tba replay` trains a new policy on that job's
curated history.

The jobs run one after another on one broker without a namespace set, each in a run dir named `run`
(as `tba run` with the defaults would): each gets topics of its own, and trains only on its own groups.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ops.config import load_config, with_overrides
from ops.job import recorded_namespace
from ops.metrics import metric_rows
from ops.names import topic_names
from ops.topics import KafkaSchemaStore, read_topic
from schemas.records import TrajectoryCodec
from tests.tiny_models import saved_tiny_llama, tiny_classifier
from trainer.checkpoint import latest_checkpoint

TBA = [sys.executable, "-m", "tba.cli"]
NAMESPACES: dict[tuple[str, str], str] = {}  # (task, mode) -> the namespace its job was given


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {
        "policy": saved_tiny_llama(root / "policy"),
        "target": saved_tiny_llama(root / "target", seed=3),
        "reward_model": tiny_classifier(root / "rm", num_labels=1),
        "classifier": tiny_classifier(root / "clf", num_labels=2),
    }
    for name, kind in (("posts", "Summarise post"), ("attacks", "Write a question about")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{name}-{i}", "prompt": f"{kind} {i}."}) + "\n" for i in range(10)))
        out[name] = str(path)
    return out


def task_settings(task: str, mode: str, models: dict) -> dict:
    """The task's settings; preference takes its reward from a reward model in one mode and from the packaged
    reward function of configs/sentiment.yaml in the other."""
    reward = ({"reward_model": models["reward_model"]} if mode == "async"
              else {"reward_fn": "policy.tasks.judges:positive_sentiment"})  # fmt: skip
    return {
        "math": {"name": "math", "train_size": 8, "eval_size": 2},
        "toy": {"name": "toy", "train_size": 8, "eval_size": 2},
        "preference": {"name": "preference", "prompts_file": models["posts"], **reward},
        "redteam": {"name": "redteam", "prompts_file": models["attacks"], "target_model": models["target"],
                    "classifier_model": models["classifier"], "target_max_new_tokens": 4, "diversity_coef": 0.1},
    }[task]  # fmt: skip


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("task", ["math", "toy", "preference", "redteam"])
def test_every_task_runs_in_both_modes_and_its_history_replays(broker, models, tmp_path, task, mode):
    run_dir = tmp_path / "run"
    cfg = load_config(
        environ={},
        kafka={"bootstrap": broker.bootstrap, "client_timeout_s": 20},  # no namespace: the job's own
        topics={"partitions": 2},
        task=task_settings(task, mode, models),
        # the tiny random policy gets no math right: keep its uninformative groups, the plumbing is the point
        filter={"scorers": ["structure", "finite_rewards", "lengths"]},
        searcher={"model": models["policy"], "samples_per_prompt": 4, "prompts_per_batch": 2, "max_new_tokens": 6,
                  "temperature": 1.0},
        buffer={"samples_per_prompt": 4},
        trainer={"mode": mode, "lora_r": 0, "prompts_per_step": 2, "max_steps": 2, "min_buffer_prompts": 2,
                 "sync_every": 1, "eval_every": 1000, "eval_prompts": 2, "eval_max_new_tokens": 4,
                 "temperature": 1.0, "run_dir": str(run_dir)},
        weights={"port": 0},
        run={"metrics_port": 0, "live_view": False, "restart_initial_s": 0.5, "budget_s": 240},
    )  # fmt: skip
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TBA__")}

    job = subprocess.run([*TBA, "run", str(config)], capture_output=True, text=True, timeout=300, env=env)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert job.returncode == 0, job.stdout + job.stderr + logs
    state = json.loads((run_dir / "job.json").read_text())
    assert {p["name"]: p["status"] for p in state["processes"]}["trainer"] == "finished", logs
    assert {p["role"] for p in state["processes"]} == (
        {"trainer", "filter"} | ({"searcher"} if mode == "async" else set())
    )
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert latest_checkpoint(run_dir).name == "step-000002"

    # the job's own topics: a namespace no other job of this module was given
    namespace = recorded_namespace(run_dir)
    assert namespace.startswith("tba-run-") and namespace not in NAMESPACES.values()
    NAMESPACES[(task, mode)] = namespace
    job_cfg = with_overrides(cfg, kafka={"namespace": namespace})
    codec = TrajectoryCodec(KafkaSchemaStore(job_cfg))
    curated = [codec.decode(r.value) for r in read_topic(job_cfg, topic_names(job_cfg).curated)]
    assert curated, logs
    own = {g.prompt_id for g in curated}
    assert all(len(g.samples) == 4 and all(np.isfinite(s.reward) for s in g.samples) for g in curated)
    assert {g.generator_id for g in curated} == ({"searcher-0"} if mode == "async" else {"trainer-sync"})
    if mode == "async":  # what the trainer trained on: groups of this job alone
        with np.load(latest_checkpoint(run_dir) / "buffer.npz", allow_pickle=True) as buffer:
            assert set(buffer["prompt_ids"].tolist()) <= own

    # a new policy from this job's curated history, in a run dir of its own
    replay = subprocess.run(
        [*TBA, "--config", str(config), "replay", "--job", str(run_dir)],
        capture_output=True, text=True, timeout=300,
        env={**env, "TBA__TRAINER__RUN_DIR": str(tmp_path / "replay"), "TBA__TRAINER__MIN_BUFFER_PROMPTS": "1",
             "TBA__TRAINER__PROMPTS_PER_STEP": "1"},
    )  # fmt: skip
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"replay trained 2 steps on {len(curated)} groups" in replay.stdout
    assert latest_checkpoint(tmp_path / "replay").name == "step-000002"
