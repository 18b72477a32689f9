"""ReplayBuffer: curated groups indexed by Kafka offset, sampled as TBA samples them.

The index is a set of numpy columns, one row per group (partition, offset, prompt, policy version, first sample,
previous group of the same prompt) and one row per sample (reward as float16, enough to weigh a draw; a 32-bit
content hash, enough to tell apart a prompt's newest samples): 32 + 6*K bytes a group (80 for K = 8), 8 more for
its place in the spill file, and up to a quarter more while a column waits to grow (bench/results/replay_scale.json).
The decoded group has the exact reward. A prompt's groups form a linked list from its newest group backwards, so no
per-prompt Python containers. Draws reach only a prompt's newest samples: the rows beyond are dropped once they are
most of the index (trainer/index_compaction.py), which so stays near prompts x 2 x per_prompt_cap / K groups.
Decoded groups live in a bounded LRU cache; an evicted group is read back by its offset (trainer/read_back.py):
from a local spill file of the records read, else from Kafka, the topic being the storage. prefetch() draws the
next step's batch and reads its groups back on another thread while the current step trains.

Sampling (TBA): with probability m a prompt that has groups from the newest policy version, drawing
only from those; otherwise any buffered prompt, drawing from its newest `per_prompt_cap` samples.
Within a prompt, samples are drawn by softmax(inv_temp * reward) (0 = uniform), exact duplicate
completions removed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ops.config import BufferConfig
from ops.errors import DecodeError, TbaError
from schemas.records import Sample, TrajectoryCodec, TrajectoryGroup
from trainer.columns import Column
from trainer.index_compaction import compacted, reachable, sample_rows

log = logging.getLogger(__name__)
FLOAT16_MAX = float(np.finfo(np.float16).max)
COMPACT_MIN_ROWS = 100_000  # below this the rows no draw reaches cost too little (~8 MB) to drop


@dataclass
class SampledPrompt:
    """K samples of one prompt, ready for the TB loss (which needs them to share a prompt)."""

    prompt_id: str
    prompt: str
    prompt_token_ids: np.ndarray
    samples: list[Sample]
    policy_versions: list[int]
    on_policy: bool  # drawn in the probability-m branch (newest policy version only)


class Draw(NamedTuple):
    """A prompt's samples chosen for a step, as (group index row, sample) pairs, before they are read."""

    pid: int
    on_policy: bool
    picked: list[tuple[int, int]]

    groups = property(lambda self: {g for g, _ in self.picked})


class ReplayBuffer:
    """codec decodes the records ingested; reader (trainer.read_back.GroupReader, in the trainer's buffer that
    trainer.curated_feed.curated_buffer makes) reads their values back by (partition, offset) and keeps those
    ingested. admit(group) -> None or the reason the trainer cannot train on it (trainer.admission.Admission);
    reject(record, reason) takes what was not admitted, undecodable records included (e.g. to the dlq)."""

    def __init__(self, cfg: BufferConfig, codec: TrajectoryCodec, reader, seed: int = 0, admit=None, reject=None):
        self.cfg = cfg
        self.admit = admit or (lambda group: None)
        self.reject = reject or _raise
        self.rejected = 0
        self.received = 0  # groups indexed since this process started (a restore counts none)
        self.topic = reader.topic  # where its records come from
        self.codec = codec
        self.rng = np.random.default_rng(seed)
        # group columns
        self.partition = Column(np.int32)
        self.offset = Column(np.int64)
        self.prompt = Column(np.int32)
        self.version = Column(np.int32)
        self.first_sample = Column(np.int64)
        self.previous = Column(np.int32)  # previous group of the same prompt, -1 for the first
        # sample columns
        self.reward = Column(np.float16)
        self.content = Column(np.uint32)
        self._prompt_ids: dict[str, int] = {}
        self._prompt_names: list[str] = []
        self._newest_group = Column(np.int32)  # per prompt: its newest group
        self.newest_version = -(2**31)
        self._newest_prompts: set[int] = set()
        self.next_offsets: dict[int, int] = {}  # partition -> next offset to ingest
        self._cache: OrderedDict[int, TrajectoryGroup] = OrderedDict()
        self._cache_lock = threading.Lock()  # a prefetch fills the cache from its own thread
        self._index_lock = threading.RLock()  # and draws from the index while the trainer's feed adds to it
        self._reader = reader
        self._prefetcher: ThreadPoolExecutor | None = None
        self.unreadable: set[int] = set()  # index rows whose records are gone from Kafka: never drawn again
        self.compact_at = COMPACT_MIN_ROWS  # index rows at which the next compact() is due
        self._pending: Future | None = None  # a prefetch in flight holds row numbers: no compaction meanwhile

    def __len__(self) -> int:
        return self.partition.size

    @property
    def num_prompts(self) -> int:
        return len(self._prompt_names)

    def index_nbytes(self) -> int:
        """Memory of the index columns and the spill file's positions (the cache of decoded groups excluded)."""
        spill = self._reader.spill.nbytes if self._reader.spill else 0
        return sum(getattr(self, name).nbytes for name in self._COLUMNS) + self._newest_group.nbytes + spill

    _GROUP_COLUMNS = ("partition", "offset", "prompt", "version", "first_sample", "previous")
    _SAMPLE_COLUMNS = ("reward", "content")
    _COLUMNS = _GROUP_COLUMNS + _SAMPLE_COLUMNS

    def state(self) -> dict[str, np.ndarray]:
        """The index and the sampler's position, for a checkpoint (decoded groups are re-read from Kafka)."""
        out = {name: getattr(self, name).values.copy() for name in self._COLUMNS}
        out["newest_group"] = self._newest_group.values.copy()
        out["prompt_ids"] = np.array(self._prompt_names, dtype=object)
        out["next_offsets"] = np.array(sorted(self.next_offsets.items()), dtype=np.int64).reshape(-1, 2)
        out["rng"] = np.array(self.rng.bit_generator.state, dtype=object)
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state(), into an empty buffer."""
        if len(self):
            raise TbaError("restore() needs an empty ReplayBuffer")
        for name in self._COLUMNS:
            getattr(self, name).extend(state[name])
        self._newest_group.extend(state["newest_group"])
        self._prompt_names = list(state["prompt_ids"])
        self._prompt_ids = {p: i for i, p in enumerate(self._prompt_names)}
        self.next_offsets = {int(p): int(o) for p, o in state["next_offsets"]}
        self.rng.bit_generator.state = state["rng"].item()
        if len(self):
            self.newest_version = int(self.version.values.max())
            self._newest_prompts = set(self.prompt.values[self.version.values == self.newest_version].tolist())

    # -- ingest ---------------------------------------------------------------------------------

    def add(self, partition: int, offset: int, group: TrajectoryGroup) -> bool:
        """Index one curated group. Returns False (and does nothing) for an offset already ingested."""
        with self._index_lock:
            if offset < self.next_offsets.get(partition, 0):
                return False
            self.next_offsets[partition] = offset + 1
            idx = len(self)
            pid = self._prompt_ids.get(group.prompt_id)
            if pid is None:
                pid = self._prompt_ids[group.prompt_id] = len(self._prompt_names)
                self._prompt_names.append(group.prompt_id)
                self._newest_group.append(-1)
            self.partition.append(partition)
            self.offset.append(offset)
            self.prompt.append(pid)
            self.version.append(group.policy_version)
            self.first_sample.append(self.reward.size)
            self.previous.append(self._newest_group.values[pid])
            self._newest_group.values[pid] = idx
            self.reward.extend([min(max(s.reward, -FLOAT16_MAX), FLOAT16_MAX) for s in group.samples])
            self.content.extend([s.digest() & 0xFFFF_FFFF for s in group.samples])
            if group.policy_version > self.newest_version:
                self.newest_version = group.policy_version
                self._newest_prompts = set()
            if group.policy_version == self.newest_version:
                self._newest_prompts.add(pid)
            self._remember(idx, group)
            self.received += 1
            return True

    def _remember(self, idx: int, group: TrajectoryGroup) -> None:
        if self.cfg.cache_groups == 0:
            return
        with self._cache_lock:
            self._cache[idx] = group
            self._cache.move_to_end(idx)
            while len(self._cache) > self.cfg.cache_groups:
                self._cache.popitem(last=False)

    def ingest(self, records) -> int:
        """Decode, admit and index Kafka ConsumerRecords of the curated topic; returns how many were new."""
        added = []
        for rec in records:
            if rec.offset < self.next_offsets.get(rec.partition, 0):
                continue
            try:
                group = self.codec.decode(rec.value)
                reason = self.admit(group)
            except DecodeError as exc:
                reason = f"undecodable: {exc.reason}"
            if reason is not None:
                self.next_offsets[rec.partition] = rec.offset + 1  # passed over, never read again
                self.rejected += 1
                self.reject(rec, reason)
                continue
            if self.add(rec.partition, rec.offset, group):
                added.append((rec.partition, rec.offset, rec.value))
        self._reader.keep(added)  # to be read back from the spill file once evicted
        return len(added)

    # -- reading groups back ----------------------------------------------------------------------

    def group(self, idx: int) -> TrajectoryGroup:
        """The decoded group at index row idx: from the cache, else read back from Kafka by offset."""
        return self._groups({idx})[idx]

    def fetch(self, idxs) -> dict[int, TrajectoryGroup]:
        """Read groups back by offset (spill file, else Kafka), all at once; those gone from both leave the index."""
        return self._fetched(self._locations(idxs))

    def _locations(self, idxs) -> dict[tuple[int, int], int]:
        return {(int(self.partition.values[i]), int(self.offset.values[i])): i for i in idxs}

    def _fetched(self, rows: dict[tuple[int, int], int]) -> dict[int, TrajectoryGroup]:
        """rows: (partition, offset) -> index row, located by the caller."""
        values, gone = self._reader.read(list(rows))
        found = {}
        for key, value in values.items():
            group = found[rows[key]] = self.codec.decode(value)
            if group.prompt_token_ids.size == 0:  # admission tokenised the prompt: again, as the record
                self.admit(group)  # does not hold the ids
            self._remember(rows[key], group)
        for partition in sorted({p for p, _ in gone}):
            offsets = [o for p, o in gone if p == partition]
            with self._index_lock:
                self.unreadable.update(rows[(partition, o)] for o in offsets)  # never drawn again
            log.warning(
                "%d groups of %s[%d] could not be read back (offsets %d..%d: retention or compaction removed "
                "them); they are dropped from the replay buffer and training goes on",
                len(offsets), self.topic, partition, min(offsets), max(offsets),
            )  # fmt: skip
        return found

    # -- sampling -------------------------------------------------------------------------------

    def sample(self, num_prompts: int, k: int | None = None) -> list[SampledPrompt]:
        """num_prompts distinct prompts (fewer if the buffer has fewer), k samples each."""
        k = k or self.cfg.samples_per_prompt
        self.compact()
        return self.read(self.draw(num_prompts, k), k)

    def prefetch(self, num_prompts: int, k: int | None = None) -> PendingBatch:
        """sample(), drawn and read back on another thread: call it for the next step before training on
        this one, and .result() when the next step starts (the same draws as sample() at this point,
        unless the feed adds groups while the step trains)."""
        k = k or self.cfg.samples_per_prompt
        self.compact()
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending = self._prefetcher.submit(self._drawn_and_read, num_prompts, k)
        return PendingBatch(self, k, self._pending)

    def compact(self) -> int:
        """Once the index holds compact_at rows, drop those no draw reaches (trainer/index_compaction.py); returns
        how many. Row numbers change: not while a prefetch is in flight (the next call), nor with a Draw out."""
        if len(self) < self.compact_at or (self._pending is not None and not self._pending.done()):
            return 0
        with self._index_lock, self._cache_lock:
            n, first = len(self), self.first_sample.values
            keep = reachable(self._newest_group.values, self.previous.values, np.diff(first, append=self.reward.size),
                             2 * self.cfg.per_prompt_cap)  # fmt: skip
            self.compact_at = max(COMPACT_MIN_ROWS, 2 * keep.size)
            if keep.size > n // 2:
                return 0
            groups = {name: getattr(self, name).values for name in self._GROUP_COLUMNS}
            samples = {name: getattr(self, name).values for name in self._SAMPLE_COLUMNS}
            renumber = compacted(groups, samples, keep)
            for name, values in {**groups, **samples}.items():
                setattr(self, name, Column.of(values))
            self._newest_group.values[:] = renumber[self._newest_group.values]
            self._cache = OrderedDict((int(renumber[i]), g) for i, g in self._cache.items() if renumber[i] >= 0)
            self.unreadable = {int(renumber[i]) for i in self.unreadable if renumber[i] >= 0}
            log.info("replay buffer index: %d groups no draw reaches dropped, %d kept", n - keep.size, keep.size)
            return n - keep.size

    def _drawn_and_read(self, num_prompts: int, k: int) -> tuple[list[Draw], dict[int, TrajectoryGroup]]:
        draws = self.draw(num_prompts, k)
        with self._cache_lock:
            missing = {g for d in draws for g in d.groups if g not in self._cache}
        with self._index_lock:
            rows = self._locations(missing)
        return draws, self._fetched(rows)

    def draw(self, num_prompts: int, k: int) -> list[Draw]:
        """Which prompts and which of their samples a step trains on, from the index alone."""
        with self._index_lock:
            if len(self) == 0:
                return []
            chosen: list[tuple[int, bool]] = []
            taken: set[int] = set()
            newest = sorted(self._newest_prompts)  # once a draw: a sort a prompt was most of a draw's time
            for _ in range(min(num_prompts, self.num_prompts)):
                left = len(newest) > len(taken & self._newest_prompts)
                on_policy = bool(self.rng.random() < self.cfg.on_policy_prob) and left
                pid = self._pick(newest if on_policy else None, taken)
                taken.add(pid)
                chosen.append((pid, on_policy))
            # a prompt none of whose groups can be read any more is left out
            return [d for d in (self._draw(pid, on_policy, k) for pid, on_policy in chosen) if d is not None]

    def read(self, draws: list[Draw], k: int, decoded=None) -> list[SampledPrompt]:
        """The drawn samples, decoded. Every group the step needs is read back at once; one found gone from
        Kafka (now unreadable) has its prompt drawn again without it, and a prompt none of whose groups can
        be read is left out."""
        decoded: dict[int, TrajectoryGroup] = dict(decoded or {})
        while True:
            draws = [d for d in draws if d is not None]
            decoded.update(self._groups(set().union(*(d.groups for d in draws)) - decoded.keys()))
            if all(d.groups <= decoded.keys() for d in draws):
                return [self._sampled(d, decoded) for d in draws]
            with self._index_lock:
                draws = [d if d.groups <= decoded.keys() else self._draw(d.pid, d.on_policy, k) for d in draws]

    def _pick(self, pool: list[int] | None, taken: set[int]) -> int:
        """Uniform over the pool (None: every buffered prompt) less those taken, of which one is left."""
        while True:  # rejection: a step takes few prompts of many
            pid = int(pool[self.rng.integers(len(pool))]) if pool else int(self.rng.integers(self.num_prompts))
            if pid not in taken:
                return pid

    def _draw(self, pid: int, on_policy: bool, k: int) -> Draw | None:
        """k of the prompt's samples drawn by reward; None when none of its groups can be read."""
        cap, n, total = self.cfg.per_prompt_cap, len(self), self.reward.size
        previous, version, first_sample = self.previous.values, self.version.values, self.first_sample.values
        g, groups, group_sizes, samples = int(self._newest_group.values[pid]), [], [], []
        while True:  # newest first, so the cap keeps the newest samples and duplicates keep the newest copy
            wanted = cap - len(samples)  # duplicates found leave room for older groups
            while g >= 0 and wanted > 0:  # a linked list, so Python: .item() is its cheapest numpy read
                if g not in self.unreadable and (not on_policy or version.item(g) == self.newest_version):
                    groups.append(g)
                    group_sizes.append((first_sample.item(g + 1) if g + 1 < n else total) - first_sample.item(g))
                    wanted -= group_sizes[-1]
                g = previous.item(g)
            rows, sizes = np.array(groups, np.int64), np.array(group_sizes, np.int64)
            samples = sample_rows(first_sample[rows], sizes)
            _, first = np.unique(self.content.values[samples], return_index=True)  # the newest copy of each
            kept = np.sort(first)[:cap]
            samples, owners = samples[kept], np.repeat(rows, sizes)[kept]
            if g < 0 or len(samples) == cap:
                break
        if not len(samples):
            return None
        logits = self.cfg.reward_inv_temp * self.reward.values[samples].astype(np.float64)  # (N,)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        picks = self.rng.choice(len(samples), size=k, replace=len(samples) < k, p=p)
        at = samples[picks] - first_sample[owners[picks]]  # the sample's place in its group
        return Draw(pid, on_policy, list(zip(owners[picks].tolist(), at.tolist(), strict=True)))

    def _sampled(self, draw: Draw, decoded: dict[int, TrajectoryGroup]) -> SampledPrompt:
        first = decoded[draw.picked[0][0]]
        return SampledPrompt(
            prompt_id=self._prompt_names[draw.pid],
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            samples=[decoded[g].samples[j] for g, j in draw.picked],
            policy_versions=[int(self.version.values[g]) for g, _ in draw.picked],
            on_policy=draw.on_policy,
        )

    def _groups(self, idxs: set[int]) -> dict[int, TrajectoryGroup]:
        with self._cache_lock:
            out = {i: self._cache[i] for i in idxs if i in self._cache}
            for i in out:
                self._cache.move_to_end(i)
        missing = [i for i in idxs if i not in out]
        if missing:
            out.update(self.fetch(missing))
        return out

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown()
            self._prefetcher = None
        self._reader.close()


@dataclass
class PendingBatch:
    """A batch being drawn and read back (ReplayBuffer.prefetch)."""

    buffer: ReplayBuffer
    k: int
    reading: Future

    def result(self) -> list[SampledPrompt]:
        draws, decoded = self.reading.result()
        return self.buffer.read(draws, self.k, decoded)


def _raise(record, reason: str) -> None:
    raise TbaError(f"curated {record.partition}:{record.offset} cannot be trained on: {reason}")
