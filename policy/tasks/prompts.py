"""Prompts from a JSON Lines file, split into train and held-out by a seeded shuffle, and as records of the
prompts topic."""

from __future__ import annotations

import json

import numpy as np

from ops.errors import ConfigError
from policy.tasks import Problem


def read_prompts(path, field: str) -> list[Problem]:
    """Problems from a JSONL file: {"prompt": str} or {"messages": [...]}; "id" (default: the line's
    number from 0) and "answer" (for tasks that check one) optional. field names the setting in errors."""
    try:
        lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field}: cannot read prompts from {path}: {exc}") from exc
    problems = []
    for i, line in enumerate(lines):
        messages = line.get("messages") or ([{"role": "user", "content": line["prompt"]}] if "prompt" in line else None)
        if not messages:
            raise ConfigError(f"{field}: line {i + 1} of {path} has neither 'prompt' nor 'messages'")
        problems.append(Problem(str(line.get("id", i)), messages[-1]["content"], str(line.get("answer", "")),
                                tuple(messages)))  # fmt: skip
    return problems


def problem_record(problem: Problem) -> dict:
    """A problem as a record of the prompts topic (schemas/prompt.avsc): everything a task needs to score
    its completions."""
    return {"prompt_id": problem.prompt_id, "question": problem.question, "answer": problem.answer,
            "messages": [{"role": m["role"], "content": m["content"]} for m in problem.messages]}  # fmt: skip


def problem_from_record(record: dict) -> Problem:
    return Problem(record["prompt_id"], record["question"], record["answer"], tuple(record["messages"]))


def load_prompts(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out) from task.prompts_file (read_prompts), split by a seeded shuffle."""
    if cfg.prompts_file is None:
        raise ConfigError(f"task.prompts_file: task {cfg.name!r} needs a JSONL file of prompts")
    problems = read_prompts(cfg.prompts_file, "task.prompts_file")
    order = np.random.default_rng(cfg.seed).permutation(len(problems))
    problems = [problems[i] for i in order]
    held = min(cfg.eval_size, max(1, len(problems) // 5))
    return problems[held:][: cfg.train_size], problems[:held]


def load_classifier(path: str | None, field: str):
    """(model, tokenizer) of a local sequence-classification model, or a ConfigError naming the field."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not path:
        raise ConfigError(f"{field}: this task needs the path of a sequence-classification model (or task.reward_fn)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot load a sequence-classification model from {path!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def classify(model, tokenizer, texts: list[str]):
    """Logits (N, labels) for a batch of texts, right-padded."""
    import torch

    with torch.no_grad():
        # an empty text would be a zero-length sequence: classify a single space instead
        enc = tokenizer([t or " " for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=1024)
        return model(**enc).logits.float()
