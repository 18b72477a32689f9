"""Preference (reward model) and red-teaming (target model + classifier) tasks with tiny local models."""

import json

import pytest
import torch

from ops.config import load_config
from ops.errors import ConfigError
from policy.tasks import RewardError, build_task
from policy.tasks.redteam import novelty
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


# task.reward_fn: rewards from outside, called once per group with prompts and completions


def length_reward(prompts, completions):
    CALLS.append((list(prompts), list(completions)))
    return [float(len(c)) for c in completions]


def one_reward_too_few(prompts, completions):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


def crashing_reward(prompts, completions):
    raise RuntimeError("the reward server is down")


CALLS: list = []


def toy(**task):
    return build_task(load_config(environ={}, task={"name": "toy", "train_size": 4, "eval_size": 2, **task}).task)


def test_a_reward_function_replaces_the_tasks_reward_once_per_group():
    CALLS.clear()
    task = toy(reward_fn="tests.test_reward_tasks:length_reward")
    problem = task.train[0]
    assert task.score(problem, ["a", "abc", ""], [True, True, False]) == [1.0, 3.0, 0.0]
    assert CALLS == [([problem.question] * 3, ["a", "abc", ""])]


def test_reward_function_failures_name_the_field():
    with pytest.raises(ConfigError, match=r"task.reward_fn: cannot import 'tests.nowhere:f'"):
        toy(reward_fn="tests.nowhere:f")
    with pytest.raises(ConfigError, match=r"task.reward_fn: 'no_colon' is not 'module:function'"):
        toy(reward_fn="no_colon")
    for fn, says in (("one_reward_too_few", "returned 2 rewards for 3 completions"),
                     ("nan_reward", "reward nan for completion 0 is not finite"),
                     ("crashing_reward", "raised RuntimeError: the reward server is down")):  # fmt: skip
        task = toy(reward_fn=f"tests.test_reward_tasks:{fn}")
        with pytest.raises(RewardError, match=rf"task.reward_fn 'tests.test_reward_tasks:{fn}': {says}"):
            task.score(task.train[0], ["a", "b", "c"], [True] * 3)


def test_preference_takes_a_packaged_sentiment_reward_and_still_penalises_unfinished(prompts):
    task = build_task(load_config(environ={}, task={
        "name": "preference", "prompts_file": str(prompts), "reward_fn": "policy.tasks.judges:positive_sentiment",
    }).task)  # fmt: skip
    happy, sad, cut = task.score(task.train[0], ["What a wonderful, happy day!", "This is awful and sad.", "great"],
                                 [True, True, False])  # fmt: skip
    assert 0.5 < happy <= 1.0 and -1.0 <= sad < -0.3 and cut == -1.0


def test_redteam_hands_the_reward_function_the_targets_answers(tmp_path, prompts):
    saved_tiny_llama(tmp_path / "target", seed=3)
    CALLS.clear()
    task = build_task(load_config(environ={}, task={
        "name": "redteam", "prompts_file": str(prompts), "target_model": str(tmp_path / "target"),
        "target_max_new_tokens": 4, "reward_fn": "tests.test_reward_tasks:length_reward",
    }).task)  # fmt: skip
    attacks = ["say something", "say more"]
    harm = task.score(task.train[0], attacks, [True, True])
    ((prompts_seen, answers),) = CALLS
    assert prompts_seen == attacks and answers == task.responses(attacks)
    assert harm == [float(len(a)) for a in answers]
