"""VersionStore: the policy versions a weight-sync service holds, and their wire forms.

publish() copies the weights into a staging buffer and returns: that copy is all the training loop
waits for. With shared memory on, the staging buffer is itself a file in /dev/shm, mapped back:
subscribers on this host map the same pages, so a version is written once and never copied again;
the next version's file is allocated right after each release, so staging into it is one memcpy.
A version becomes visible only once complete, so no subscriber ever sees one half-written; it is
released to this host's subscribers first (checked with xxh3), then hashed for the streams (which
start sending before, and end with the xxh3) and with sha256 for the announcement, off the training
loop's time. The store keeps the newest weights.keep_versions
versions (the bases deltas are computed against), encodes each (version, base) pair once however many
subscribers need it, removes a version's file once superseded, and announces every released version
on the compacted policy-versions topic.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import torch

from ops import shared_memory
from ops.config import TbaConfig
from schemas.weights import EncodedVersion, WeightVersion, encode, fill, layout, seal, stage

log = logging.getLogger(__name__)


class VersionStore:
    def __init__(self, cfg: TbaConfig, announce: bool = True):
        self.cfg = cfg
        self.wcfg = cfg.weights
        self.versions: OrderedDict[int, WeightVersion] = OrderedDict()  # newest last, keep_versions of them
        self._encoded: dict[tuple[int, int], EncodedVersion] = {}  # (version, base) -> wire form
        self.changed = threading.Condition()  # notified on every release
        self._encode_lock = threading.Lock()
        self._release_lock = threading.Lock()  # releases, announcements included, happen one at a time, in order
        self._next_version = 0
        self._announcer = _Announcer(cfg) if announce else None
        self._sealing: list[threading.Thread] = []
        self._shared: dict[int, tuple[Path, bytes]] = {}  # version -> its shared-memory file and xxh3
        self._shared_lock = threading.Lock()
        self._spare: shared_memory.Reservation | None = None  # the next version's file, allocated ahead
        self._spare_lock = threading.Lock()
        self._closed = False
        if self.wcfg.shared_memory != "never" and (removed := shared_memory.remove_orphans()):
            log.info("removed %d shared-memory weight files of services no longer running", removed)

    # -- trainer side -----------------------------------------------------------------------------

    def publish(
        self, state_dict: dict[str, torch.Tensor], step: int, model_id: str = "", version: int | None = None
    ) -> int:
        """Stage the weights (a copy, on the caller's time) and release them in the background.

        version defaults to one more than the last; returns it. wait_published(version) blocks until
        subscribers can get it.
        """
        with self.changed:
            if version is None:
                version = self._next_version
            self._next_version = max(self._next_version, version + 1)
        specs, buffer, path = self._stage(state_dict, version)
        thread = threading.Thread(target=self._seal, args=(specs, buffer, path, version, step, model_id), daemon=True)
        thread.start()
        self._sealing = [t for t in self._sealing if t.is_alive()] + [thread]
        return version

    def _stage(self, state_dict, version: int):
        """(specs, buffer, shared-memory file or None): staged in /dev/shm when this host may share."""
        if self.wcfg.shared_memory != "never":
            try:
                return self._stage_shared(state_dict, version)
            except OSError as exc:  # /dev/shm full or too small (containers): stage in private memory
                log.warning("cannot stage version %d in shared memory (%s)", version, exc)
        return *stage(state_dict), None

    def _stage_shared(self, state_dict, version: int):
        """Into the file reserved after the last release when it has the size (one memcpy), else a new one."""
        specs, tensors = layout(state_dict)
        nbytes = sum(t.nbytes for t in specs)
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.nbytes == nbytes:
            fill(spare.buffer, specs, tensors)
            return specs, spare.buffer, spare.name(f"v{version}")
        if spare is not None:
            spare.discard()
        # a fresh file written in one pass (~0.18 s for 270 MB) beats reserving one now (~0.26 s)
        path = shared_memory.write((t.cpu().numpy() for t in tensors), f"v{version}")
        return specs, shared_memory.map_readonly(path, nbytes), path

    def _reserve_spare(self, nbytes: int) -> None:
        """Allocate the next version's file now, between publishes, off the training loop's time."""
        try:
            spare = shared_memory.Reservation(nbytes)
        except OSError as exc:
            log.info("no spare shared-memory file for the next version (%s)", exc)
            return
        with self._spare_lock:
            if self._closed or self._spare is not None:
                spare.discard()
            else:
                self._spare = spare

    def _seal(self, specs, buffer, path: Path | None, version: int, step: int, model_id: str) -> None:
        sealed = seal(specs, buffer, version, step, model_id)
        if path is not None:
            with self._shared_lock:
                self._shared[version] = (path, sealed.xxh3)
        self.release(sealed)
        if path is not None:
            self._reserve_spare(sealed.nbytes)

    def release(self, version: WeightVersion) -> None:
        """Make a sealed version the newest one (older ones that arrive late are dropped)."""
        with self._release_lock:
            with self.changed:
                if self.versions and version.version <= next(reversed(self.versions)):
                    return
                self.versions[version.version] = version
                self._next_version = max(self._next_version, version.version + 1)
                while len(self.versions) > self.wcfg.keep_versions:
                    old, _ = self.versions.popitem(last=False)
                    self._encoded = {k: v for k, v in self._encoded.items() if old not in k}
                self.changed.notify_all()
            self._unshare(older_than=version.version)
            _ = version.xxh3  # hashed while the streams already send the bytes: they end with this checksum
            if self._announcer is not None:  # the announcement carries the sha256: hashed now, after
                self._announcer.announce(version)  # this host's subscribers have the version

    def shared(self, version: WeightVersion) -> tuple[Path, bytes]:
        """The version's shared-memory file (for subscribers on this host) and its xxh3, written once
        if the version was not staged there (it came through Publish)."""
        with self._shared_lock:
            if version.version not in self._shared:
                path = shared_memory.write([version.buffer], f"v{version.version}")
                self._shared[version.version] = (path, version.xxh3)
            return self._shared[version.version]

    def _unshare(self, older_than: int | None = None) -> None:
        """Remove the files of superseded versions (whoever mapped one, this store included, keeps it)."""
        with self._shared_lock:
            for number in [v for v in self._shared if older_than is None or v < older_than]:
                self._shared.pop(number)[0].unlink(missing_ok=True)

    def wait_published(self, version: int, timeout_s: float = 60) -> WeightVersion:
        with self.changed:
            ok = self.changed.wait_for(lambda: self.latest is not None and self.latest.version >= version, timeout_s)
        if not ok:
            raise TimeoutError(f"version {version} was not released within {timeout_s}s")
        return self.versions.get(version) or self.latest

    @property
    def latest(self) -> WeightVersion | None:
        return self.versions[next(reversed(self.versions))] if self.versions else None

    def encoded(self, version: WeightVersion, base: WeightVersion | None, checksum: str) -> EncodedVersion:
        """The wire form for (version, base), with a sha256 or xxh3 header, computed once however many
        subscribers need it."""
        key = (version.version, base.version if base is not None else -1, checksum)
        with self._encode_lock:
            if key not in self._encoded:
                self._encoded[key] = encode(version, base, self.wcfg.delta_zstd_level, checksum)
            return self._encoded[key]

    def close(self) -> None:
        """Wait for versions still being sealed, then flush the announcements."""
        for t in self._sealing:
            t.join()
        with self._spare_lock:
            self._closed = True
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
        self._unshare()
        if self._announcer is not None:
            self._announcer.close()


class _Announcer:
    """Puts each released version on the compacted policy-versions topic (key "policy"), from a thread of
    its own: a release never waits for Kafka, and close() waits for it a bounded time, so the service
    stops in time whatever Kafka does (away, the producer would wait on its bootstrap, then on close)."""

    close_timeout_s = 5.0  # for announcements still in flight; Kafka answering, the flush takes milliseconds

    def __init__(self, cfg: TbaConfig):
        self.cfg = cfg
        self._pending: queue.Queue[SimpleNamespace | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="policy-version-announcer", daemon=True)
        self._thread.start()

    def announce(self, version: WeightVersion) -> None:
        # what the record says, not the version: a queue waiting on Kafka must not hold the weights
        fields = ("version", "step", "sha256", "wall_time", "model_id", "dtype", "nbytes")
        self._pending.put(SimpleNamespace(**{name: getattr(version, name) for name in fields}))

    def _run(self) -> None:
        from ops import kafka_clients
        from ops.topics import JobTopics

        producer = versions = None
        while (version := self._pending.get()) is not None:
            try:
                if producer is None:
                    versions = JobTopics(self.cfg).policy_versions
                    producer = kafka_clients.producer(self.cfg, linger_ms=0)
                versions.produce(producer, version, key=b"policy")
            except Exception as exc:  # the service keeps serving weights when Kafka is away
                log.warning("could not announce policy version %d on Kafka: %s", version.version, exc)
        if producer is not None:
            try:
                producer.flush(timeout=self.close_timeout_s)
            finally:
                producer.close(timeout=self.close_timeout_s)

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            log.warning(
                "announcements of policy versions still waiting on Kafka at %s after %.0fs: left undone",
                self.cfg.kafka.bootstrap,
                self.close_timeout_s,
            )
