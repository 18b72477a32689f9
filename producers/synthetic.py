"""Synthetic trajectory groups (arithmetic prompts, random tokens) for the demo, tests and benchmarks.

They are real TrajectoryGroups with consistent lengths and log-probs <= 0, so every default scorer
accepts them; the `bad_*` helpers make the malformed kinds the filter must route to the dlq.
"""

from __future__ import annotations

import numpy as np

from schemas.records import Sample, TrajectoryGroup

VOCAB = 49_152


def synthetic_group(
    rng: np.random.Generator,
    prompt_index: int,
    samples: int = 8,
    tokens: int = 64,
    policy_version: int = 0,
    generator_id: str = "synthetic",
    vocab: int = VOCAB,
) -> TrajectoryGroup:
    """One group for prompt `prompt_index`: `samples` completions of about `tokens` tokens each."""
    a, b = prompt_index % 97, (prompt_index * 7) % 89
    out = []
    for j in range(samples):
        n = int(rng.integers(max(1, tokens // 2), tokens + 1))
        # the first sample right and the second wrong: every group carries a learning signal
        guess = a + b + (int(rng.integers(-2, 3)) if j > 1 else j)
        out.append(
            Sample(
                completion=f"{a} + {b} = {guess}",
                token_ids=rng.integers(0, vocab, n, dtype=np.int32),
                logprobs=-rng.exponential(1.0, n).astype(np.float32),
                ref_logprobs=-rng.exponential(1.0, n).astype(np.float32),
                reward=float(guess == a + b),
                finish_reason="stop",
            )
        )
    return TrajectoryGroup(
        prompt_id=f"arith-{prompt_index}",
        task="synthetic_arithmetic",
        prompt=f"What is {a} + {b}?",
        prompt_token_ids=rng.integers(0, vocab, 16, dtype=np.int32),
        samples=out,
        policy_version=policy_version,
        generator_id=generator_id,
        model_id="",  # made by no model: any job may train on it
    )


def bad_nan_reward(group: TrajectoryGroup) -> TrajectoryGroup:
    group.samples[0].reward = float("nan")
    return group


def bad_lengths(group: TrajectoryGroup) -> TrajectoryGroup:
    group.samples[-1].logprobs = group.samples[-1].logprobs[:-1]
    return group


def bad_empty(group: TrajectoryGroup) -> TrajectoryGroup:
    s = group.samples[0]
    s.completion, s.token_ids = "", s.token_ids[:0]
    s.logprobs, s.ref_logprobs = s.logprobs[:0], s.ref_logprobs[:0]
    return group


BAD_KINDS = {"finite_rewards": bad_nan_reward, "lengths": bad_lengths, "degenerate": bad_empty}
