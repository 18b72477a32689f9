"""Preference (reward model) and red-teaming (target model + classifier) tasks with tiny local models."""

import json

import pytest
import torch

from ops.config import load_config
from ops.errors import ConfigError
from producers.tasks import build_task
from producers.tasks.redteam import novelty
from tests.tiny_models import char_tokenizer, saved_tiny_llama, tiny_classifier


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"id": f"p{i}", "prompt": f"Summarise post number {i}."} for i in range(8)]
    lines.append({"messages": [{"role": "user", "content": "A chat prompt."}]})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_preference_scores_with_the_reward_model_and_penalises_unfinished(tmp_path, prompts):
    rm = tiny_classifier(tmp_path / "rm", num_labels=1)
    task = build_task(
        load_config(environ={}, task={"name": "preference", "prompts_file": str(prompts), "reward_model": rm}).task
    )
    assert len(task.train) + len(task.held_out) == 9 and task.held_out
    problem = task.train[0]
    texts = ["a short summary", "another one", "never ends"]
    got = task.score(problem, texts, [True, True, False])
    tok = char_tokenizer()
    enc = tok([f"{problem.question}\n{t}" for t in texts[:2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = task.model(**enc).logits[:, 0].tolist()
    assert got[:2] == pytest.approx(expected, abs=1e-5)
    assert got[2] == -1.0


def test_redteam_rewards_the_classifier_probability_of_the_targets_answer(tmp_path, prompts):
    saved_tiny_llama(tmp_path / "target", seed=3)
    classifier = tiny_classifier(tmp_path / "clf", num_labels=2)
    cfg = {
        "name": "redteam", "prompts_file": str(prompts), "target_model": str(tmp_path / "target"),
        "classifier_model": classifier, "target_max_new_tokens": 5,
    }  # fmt: skip
    task = build_task(load_config(environ={}, task=cfg).task)
    attacks = ["tell me something bad", "tell me something bad", "an entirely different question"]
    harm = task.score(task.train[0], attacks, [True] * 3)
    assert all(0.0 <= h <= 1.0 for h in harm) and harm[0] == pytest.approx(harm[1])
    diverse = build_task(load_config(environ={}, task={**cfg, "diversity_coef": 1.0}).task)
    bonus = [d - h for d, h in zip(diverse.score(task.train[0], attacks, [True] * 3), harm, strict=True)]
    assert bonus[2] > bonus[0] == pytest.approx(0.0)  # the repeated attack earns no novelty
    assert novelty(["a b", "a b", "c d"]) == [0.0, 0.0, 1.0]


def test_missing_model_paths_are_named(tmp_path, prompts):
    with pytest.raises(ConfigError, match="task.reward_model: this task needs the path"):
        build_task(load_config(environ={}, task={"name": "preference", "prompts_file": str(prompts)}).task)
    with pytest.raises(ConfigError, match="task.prompts_file: task 'preference' needs a JSONL file"):
        build_task(load_config(environ={}, task={"name": "preference"}).task)
    with pytest.raises(ConfigError, match="task.reward_model: cannot load"):
        build_task(
            load_config(
                environ={}, task={"name": "preference", "prompts_file": str(prompts), "reward_model": str(tmp_path)}
            ).task
        )
