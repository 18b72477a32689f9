"""Quality and safety scorers, applied in the configured order; the first rejection wins.

A scorer is a callable group -> Verdict. Its score is attached to accepted groups (group.scores[name]);
its reason is what the dead-letter topic records. Add one by writing a function or class and
registering it in SCORERS.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import numpy as np

from ops.config import FilterConfig, ScorerName
from ops.errors import ConfigError
from ops.imports import import_callable
from schemas.records import TrajectoryGroup

FINISH_REASONS = {"stop", "length"}


@dataclass(frozen=True)
class Verdict:
    score: float
    reason: str | None = None  # None: accepted

    @property
    def accepted(self) -> bool:
        return self.reason is None


Scorer = Callable[[TrajectoryGroup], Verdict]


def structure(group: TrajectoryGroup) -> Verdict:
    """Ids present, at least one sample, known finish reasons, no negative token ids."""
    if not group.group_id or not group.prompt_id:
        return Verdict(0.0, "missing group_id or prompt_id")
    if reason := group.empty():
        return Verdict(0.0, reason)
    for i, s in enumerate(group.samples):
        if s.finish_reason not in FINISH_REASONS:
            return Verdict(0.0, f"sample {i}: finish_reason {s.finish_reason!r} is not one of {sorted(FINISH_REASONS)}")
        if s.token_ids.size and s.token_ids.min() < 0:
            return Verdict(0.0, f"sample {i}: negative token id")
    if group.prompt_token_ids.size and group.prompt_token_ids.min() < 0:
        return Verdict(0.0, "prompt: negative token id")
    return Verdict(1.0)


def finite_rewards(group: TrajectoryGroup) -> Verdict:
    rewards = group.rewards
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        return Verdict(0.0, f"sample {bad[0]}: reward is {rewards[bad[0]]} (must be finite)")
    return Verdict(float(rewards.mean()))


def lengths(group: TrajectoryGroup) -> Verdict:
    """One reference log-prob per token, and one behaviour log-prob per token or none; all finite and <= 0."""
    for i, s in enumerate(group.samples):
        if mismatch := s.logprobs_mismatch():
            return Verdict(0.0, f"sample {i}: {mismatch}")
    # one vectorised check for the whole group; look for the culprit only when it fails
    values = np.concatenate([a for s in group.samples for a in (s.logprobs, s.ref_logprobs)])
    if values.size and not (np.isfinite(values).all() and values.max() <= 1e-4):
        for i, s in enumerate(group.samples):
            for name, arr in (("logprobs", s.logprobs), ("ref_logprobs", s.ref_logprobs)):
                if arr.size and not (np.isfinite(arr).all() and arr.max() <= 1e-4):
                    return Verdict(0.0, f"sample {i}: {name} must be finite and <= 0")
    return Verdict(1.0)


def distinct_ngram_ratios(token_arrays: list[np.ndarray], n: int) -> np.ndarray:
    """Per sequence, distinct n-grams / n-grams (1.0 when shorter than n); all sequences in one pass.

    Each n-gram becomes one 64-bit polynomial hash (wrapping multiply) salted by its sequence, so a
    single 1-D unique over the whole group replaces a unique per sequence.
    """
    lens = np.array([t.size for t in token_arrays])  # (K,)
    grams = np.maximum(lens - n + 1, 0)  # (K,)
    ratios = np.ones(len(token_arrays))
    if grams.sum() == 0:
        return ratios
    tokens = np.concatenate(token_arrays).astype(np.uint64)  # (T,)
    count = tokens.size - n + 1
    h = np.zeros(count, np.uint64)
    for k in range(n):
        h = h * np.uint64(0x9E3779B97F4A7C15) + tokens[k : k + count]
    seq = np.repeat(np.arange(len(lens)), lens)[:count]  # (count,) sequence of each n-gram start
    pos = np.arange(count) - (np.cumsum(lens) - lens)[seq]
    keep = pos < grams[seq]  # n-grams that do not cross into the next sequence
    salted = h[keep] ^ (seq[keep].astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    _, first = np.unique(salted, return_index=True)
    distinct = np.bincount(seq[keep][first], minlength=len(lens))
    has = grams > 0
    ratios[has] = distinct[has] / grams[has]
    return ratios


class Degenerate:
    """Empty completions, and completions that mostly repeat themselves."""

    def __init__(self, cfg: FilterConfig):
        self.n, self.min_ratio, self.min_tokens = (
            cfg.repetition_ngram,
            cfg.min_distinct_ngram_ratio,
            cfg.repetition_min_tokens,
        )

    def __call__(self, group: TrajectoryGroup) -> Verdict:
        for i, s in enumerate(group.samples):
            if s.token_ids.size == 0 or not s.completion.strip():
                return Verdict(0.0, f"sample {i}: empty completion")
        long = [s.token_ids for s in group.samples if s.token_ids.size >= self.min_tokens]
        if not long:
            return Verdict(1.0)
        ratios = distinct_ngram_ratios(long, self.n)
        worst = int(ratios.argmin())
        if ratios[worst] < self.min_ratio:
            i = next(j for j, s in enumerate(group.samples) if s.token_ids is long[worst])
            return Verdict(
                float(ratios[worst]), f"sample {i}: degenerate repetition ({ratios[worst]:.2f} distinct {self.n}-grams)"
            )
        return Verdict(float(ratios[worst]))


class LengthLimits:
    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def __call__(self, group: TrajectoryGroup) -> Verdict:
        c, k = self.cfg, len(group.samples)
        if not c.min_samples <= k <= c.max_samples:
            return Verdict(0.0, f"{k} samples, outside [{c.min_samples}, {c.max_samples}]")
        if group.prompt_token_ids.size > c.max_prompt_tokens:
            return Verdict(0.0, f"prompt has {group.prompt_token_ids.size} tokens (max {c.max_prompt_tokens})")
        longest = max(s.token_ids.size for s in group.samples)
        if longest > c.max_completion_tokens:
            return Verdict(0.0, f"a completion has {longest} tokens (max {c.max_completion_tokens})")
        return Verdict(float(longest))


class Dedupe:
    """Exact duplicates of a recent group's content (prompt and completions).

    Remembers which group_id a digest came from, so the same group seen again after an aborted
    transaction or a restart is not mistaken for a duplicate of itself.
    """

    def __init__(self, cfg: FilterConfig):
        self.window = cfg.dedupe_window
        self.seen: OrderedDict[bytes, str] = OrderedDict()

    def __call__(self, group: TrajectoryGroup) -> Verdict:
        digest = group.digest()
        first = self.seen.get(digest)
        if first is not None and first != group.group_id:
            return Verdict(0.0, f"exact duplicate of group {first}")
        self.seen[digest] = group.group_id
        self.seen.move_to_end(digest)
        if len(self.seen) > self.window:
            self.seen.popitem(last=False)
        return Verdict(1.0)


class Safety:
    """Blocklisted words, regular expressions, and optionally a classifier ("module:function")."""

    def __init__(self, cfg: FilterConfig):
        # one pattern per rule, so a rejection names the rule, never the text it matched (the text
        # is in the dead letter's original bytes already; its reason is shown by `tba inspect`)
        rules = [(f"filter.blocklist[{i}]", rf"\b{re.escape(w)}\b") for i, w in enumerate(cfg.blocklist)]
        rules += [(f"filter.block_patterns[{i}]", p) for i, p in enumerate(cfg.block_patterns)]
        try:
            self.rules = [(name, re.compile(p, re.IGNORECASE)) for name, p in rules]
        except re.error as exc:
            raise ConfigError(f"filter.block_patterns: invalid regular expression: {exc}") from exc
        classifier = cfg.safety_classifier
        self.classifier = import_callable(classifier, "filter.safety_classifier") if classifier else None
        self.threshold = cfg.safety_threshold

    def __call__(self, group: TrajectoryGroup) -> Verdict:
        texts = [s.completion for s in group.samples]
        for i, text in enumerate(texts):
            for name, rule in self.rules:
                if rule.search(text):
                    return Verdict(1.0, f"sample {i}: matched {name}")
        if self.classifier is None:
            return Verdict(0.0)
        probs = [float(p) for p in self.classifier(texts)]
        worst = max(probs, default=0.0)
        if not math.isfinite(worst) or worst >= self.threshold:
            i = probs.index(worst)
            return Verdict(worst, f"sample {i}: safety classifier scored {worst:.3f} (threshold {self.threshold})")
        return Verdict(worst)


class Informative:
    """A group whose rewards all lie within min_reward_range carries no signal for a group-relative
    objective (TB's logZ, RLOO, GRPO): training on it only spends a step. On by default; 0 keeps all."""

    def __init__(self, cfg: FilterConfig):
        self.min_range = cfg.min_reward_range

    def __call__(self, group: TrajectoryGroup) -> Verdict:
        spread = float(np.ptp(group.rewards)) if group.samples else 0.0
        if spread < self.min_range:
            return Verdict(spread, f"rewards span {spread:.3g} < filter.min_reward_range {self.min_range}: no signal")
        return Verdict(spread)


# the registry: filter.scorers names these, as ops/config.py's ScorerName spells them for validation
SCORERS: dict[ScorerName, Callable[[FilterConfig], Scorer]] = {
    "structure": lambda cfg: structure,
    "finite_rewards": lambda cfg: finite_rewards,
    "lengths": lambda cfg: lengths,
    "degenerate": Degenerate,
    "length_limits": LengthLimits,
    "dedupe": Dedupe,
    "safety": Safety,
    "informative": Informative,
}


if set(SCORERS) != set(get_args(ScorerName)):  # a config could name a scorer that is not here, or miss one
    raise TypeError(f"scorer registry {sorted(SCORERS)} != ops.config.ScorerName {sorted(get_args(ScorerName))}")


def build_scorers(cfg: FilterConfig) -> list[tuple[str, Scorer]]:
    """The configured scorers, in order, as (name, scorer)."""
    return [(name, SCORERS[name](cfg)) for name in cfg.scorers]
