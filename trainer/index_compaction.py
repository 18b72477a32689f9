"""Which rows of the replay buffer's index a draw can still reach, and the index without the others.

A draw walks a prompt's groups from the newest back until it has `per_prompt_cap` samples (more only past
duplicates, unreadable groups or, on policy, older versions), so the groups beyond 2 x per_prompt_cap samples
of their prompt are never read again: ReplayBuffer.compact() drops them once they are most of the index.
The rows kept keep their order, so every prompt's list, and so every draw, is the same after as before.
"""

from __future__ import annotations

import numpy as np


def sample_rows(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The sample rows of groups whose samples start at starts, sizes of them each, group after group."""
    return np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())


def reachable(newest_group: np.ndarray, previous: np.ndarray, sizes: np.ndarray, room: int) -> np.ndarray:
    """Each prompt's newest groups up to `room` samples, as ascending rows (a linked list: Python, .item())."""
    keep = []
    for g in newest_group.tolist():
        counted = 0
        while g >= 0 and counted < room:
            keep.append(g)
            counted += sizes.item(g)
            g = previous.item(g)
    return np.sort(np.array(keep, np.int64))


def compacted(groups: dict[str, np.ndarray], samples: dict[str, np.ndarray], keep: np.ndarray) -> np.ndarray:
    """Keep only the rows `keep` of the group columns (first_sample and previous renumbered) and their samples,
    in place in the dicts; returns old row -> new row, -1 for a row dropped (index -1 too: 'none' stays -1)."""
    renumber = np.full(groups["first_sample"].size + 1, -1, np.int64)
    renumber[keep] = np.arange(keep.size)
    total = next(iter(samples.values())).size
    sizes = np.diff(groups["first_sample"], append=total)[keep]
    rows = sample_rows(groups["first_sample"][keep], sizes)
    for name, column in groups.items():
        groups[name] = column[keep]
    groups["first_sample"] = np.cumsum(sizes) - sizes
    groups["previous"] = renumber[groups["previous"]]
    for name, column in samples.items():
        samples[name] = column[rows]
    return renumber
