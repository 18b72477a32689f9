"""Scorers are pure functions of a group: each rejection names the sample and what is wrong."""

import numpy as np

from consumers.scorers import build_scorers
from ops.config import load_config
from producers.synthetic import bad_empty, bad_lengths, bad_nan_reward, synthetic_group


def verdicts(group, **filter_cfg):
    cfg = load_config(environ={}, filter=filter_cfg).filter
    return {name: scorer(group) for name, scorer in build_scorers(cfg)}


def test_a_clean_group_passes_every_default_scorer(rng):
    result = verdicts(synthetic_group(rng, 1))
    assert all(v.accepted for v in result.values()), result


def test_each_malformed_kind_is_rejected_by_its_scorer(rng):
    assert "reward is nan" in verdicts(bad_nan_reward(synthetic_group(rng, 1)))["finite_rewards"].reason
    assert "logprobs for" in verdicts(bad_lengths(synthetic_group(rng, 1)))["lengths"].reason
    assert "empty completion" in verdicts(bad_empty(synthetic_group(rng, 1)))["degenerate"].reason


def test_repetition_is_degenerate(rng):
    group = synthetic_group(rng, 1, samples=2, tokens=64)
    s = group.samples[1]
    s.token_ids = np.tile(np.array([5, 6, 7], np.int32), 30)
    s.logprobs = s.ref_logprobs = np.full(90, -0.1, np.float32)
    assert "degenerate repetition" in verdicts(group)["degenerate"].reason


def test_length_limits_and_sample_counts(rng):
    group = synthetic_group(rng, 1, samples=3, tokens=64)
    assert "max 10" in verdicts(group, max_completion_tokens=10)["length_limits"].reason
    assert "outside [4, 256]" in verdicts(group, min_samples=4)["length_limits"].reason


def test_exact_duplicate_groups_are_caught_but_a_redelivery_is_not(rng):
    (dedupe,) = [s for n, s in build_scorers(load_config(environ={}).filter) if n == "dedupe"]
    group = synthetic_group(rng, 1)
    assert dedupe(group).accepted
    assert dedupe(group).accepted  # same group_id again: a redelivery, not a duplicate
    copy = synthetic_group(np.random.default_rng(1234), 1)
    copy.samples = group.samples
    assert "exact duplicate of group" in dedupe(copy).reason


def test_safety_blocklist_pattern_and_classifier(rng):
    group = synthetic_group(rng, 1)
    group.samples[2].completion = "this has a Forbidden word"
    assert verdicts(group, blocklist=["other", "forbidden"])["safety"].reason == "sample 2: matched filter.blocklist[1]"
    assert verdicts(group, block_patterns=[r"w[o0]rd"])["safety"].reason == "sample 2: matched filter.block_patterns[0]"
    # the reason names the rule, never the sensitive text it matched (that stays in the letter's bytes)
    group.samples[0].completion = "my number is 123-45-6789"
    reason = verdicts(group, block_patterns=[r"\d{3}-\d{2}-\d{4}"])["safety"].reason
    assert reason == "sample 0: matched filter.block_patterns[0]" and "6789" not in reason
    flagged = verdicts(group, safety_classifier="tests.test_scorers:length_classifier", safety_threshold=0.5)
    assert "safety classifier scored" in flagged["safety"].reason
    assert verdicts(synthetic_group(rng, 2), safety_classifier="tests.test_scorers:length_classifier")[
        "safety"
    ].accepted


def length_classifier(texts):
    """A stand-in classifier model: flags long completions (the hook takes any importable callable)."""
    return [min(1.0, len(t) / 20) if "word" in t else 0.0 for t in texts]


def test_distinct_ngram_ratios_match_a_plain_count(rng):
    from consumers.scorers import distinct_ngram_ratios

    seqs = [rng.integers(0, 5, int(n), dtype=np.int32) for n in (0, 2, 3, 10, 40, 7)]
    got = distinct_ngram_ratios(seqs, 3)
    for seq, ratio in zip(seqs, got, strict=True):
        grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
        assert ratio == (len(set(grams)) / len(grams) if grams else 1.0)
