"""WeightSubscriber: a searcher's side of weight sync, and loading a version into a model in place.

A background thread keeps one Subscribe call open (calling again when the server ends it before
its deadline), reconnects with exponential backoff when the server goes away, verifies each version's
checksum (xxh3-128 over every byte, sent after the data; sha256 from a server that offers only that) and
keeps only the newest: the generation loop calls take() between batches and swaps weights when there is
something new. A version that fails its checksum is dropped and fetched again. On the server's host
(weights.shared_memory) a version is mapped from shared memory instead, checked with xxh3 too.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from dataclasses import dataclass, field

import grpc

from ops import shared_memory
from ops.config import WeightsConfig
from ops.errors import TbaError
from ops.grpc_security import call_metadata, channel, tokens
from schemas import weight_sync_pb2 as pb
from schemas.chunk_wire import WeightSyncStub
from schemas.weights import ChecksumError, VersionAssembler, WeightVersion, verified_mapping

log = logging.getLogger(__name__)

FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
RECENT_VERSIONS = 64


@dataclass
class SubscriberStats:
    versions: int = 0
    checksum_failures: int = 0
    reconnects: int = 0
    wire_bytes: int = 0
    shared_memory: int = 0  # versions mapped from the server's shared memory instead of received
    malformed: int = 0  # streams dropped for breaking the protocol (then subscribed again)
    # the newest version numbers, in the order they arrived: bounded, as a job lives for weeks of versions
    received: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_VERSIONS))


class WeightSubscriber:
    def __init__(self, cfg: WeightsConfig, target: str, subscriber_id: str = "searcher", interceptors=()):
        self.cfg = cfg
        self.target = target
        self.subscriber_id = subscriber_id
        self._channel = channel(cfg, target, interceptors)
        self._stub = WeightSyncStub(self._channel)
        self._metadata = call_metadata(tokens(cfg)[1] or tokens(cfg)[0])
        self._newest: WeightVersion | None = None
        self._taken = -1
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._call = None
        self.error: TbaError | None = None
        self.stats = SubscriberStats()
        self._thread = threading.Thread(target=self._run, name=f"weights-{subscriber_id}", daemon=True)

    def start(self) -> WeightSubscriber:
        self._thread.start()
        return self

    @property
    def newest(self) -> WeightVersion | None:
        return self._newest

    def take(self) -> WeightVersion | None:
        """The newest version not taken yet, or None: call between generation batches. Raises the error that
        stopped the subscriber, so that its process goes down saying why rather than generate on with old
        weights until it pauses for lag, for good."""
        if self.error is not None:
            raise self.error
        with self._arrived:
            if self._newest is None or self._newest.version <= self._taken:
                return None
            self._taken = self._newest.version
            return self._newest

    def wait_for(self, version: int, timeout_s: float) -> WeightVersion:
        """Block until a version >= version has arrived (or raise the subscriber's fatal error)."""
        with self._arrived:
            self._arrived.wait_for(
                lambda: self.error is not None or (self._newest is not None and self._newest.version >= version),
                timeout_s,
            )
        if self.error is not None:
            raise self.error
        if self._newest is None or self._newest.version < version:
            raise TimeoutError(f"weight version {version} did not arrive from {self.target} within {timeout_s}s")
        return self._newest

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=10)
        self._channel.close()

    def _run(self) -> None:
        try:
            self._keep_subscribed()
        except Exception as exc:  # a bug, not a network fault: the process must stop and say so, not go on deaf
            log.exception("%s: weight subscriber stopped", self.subscriber_id)
            self._fail(TbaError(f"weight subscriber stopped: {type(exc).__name__}: {exc}"))

    def _fail(self, error: TbaError) -> None:
        self.error = error
        with self._arrived:
            self._arrived.notify_all()

    def _keep_subscribed(self) -> None:
        backoff = self.cfg.reconnect_initial_s
        while not self._stop.is_set():
            try:
                self._subscribe_once()
                backoff = self.cfg.reconnect_initial_s
            except ChecksumError as exc:
                self.stats.checksum_failures += 1
                log.warning("%s; fetching it again", exc)
            except TbaError as exc:  # a stream that broke the protocol: drop it, subscribe afresh after a pause
                self.stats.malformed += 1
                log.warning("weight sync at %s sent a malformed stream (%s); subscribing again", self.target, exc)
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                if exc.code() in FATAL:
                    self._fail(TbaError(f"weight sync at {self.target} refused this subscriber: {exc.details()}"))
                    return
                self.stats.reconnects += 1
                # once per outage, a line that says what to check; the retries themselves at info
                level = logging.WARNING if backoff == self.cfg.reconnect_initial_s else logging.INFO
                log.log(level, "weight sync at %s: %s; generating with the weights held until it answers "
                        "(check searcher.weights_target or weights.host/port); retrying in %.1fs",
                        self.target, exc.code().name, backoff)  # fmt: skip
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)

    def _subscribe_once(self) -> None:
        held = self._newest
        request = pb.SubscribeRequest(
            subscriber_id=self.subscriber_id,
            have_version=held.version if held is not None else -1,
            delta_ok=self.cfg.delta,  # deltas apply to have_version, or to what this call already sent
            host_id=shared_memory.host_id() if self.cfg.shared_memory != "never" else "",
            xxh3_ok=True,
            checksum_after_data=True,
        )
        self._call = self._stub.Subscribe(request, timeout=self.cfg.subscription_s, metadata=self._metadata)
        assembler, received = None, 0
        try:
            for chunk in self._call:
                header = chunk.header if isinstance(chunk, pb.Chunk) and chunk.HasField("header") else None
                if header is not None and chunk.shared_memory_path:  # on the server's host: map the bytes
                    self._deliver(self._mapped(chunk), "mapped from shared memory")
                    continue
                if header is not None:
                    assembler, received = VersionAssembler(header, self._newest, checksum_after_data=True), 0
                else:  # bytes of a tensor, or the checksum that follows them
                    if assembler is None:
                        raise TbaError("a data chunk before any version's header")
                    added = assembler.add(chunk)
                    self.stats.wire_bytes += added
                    received += added
                if assembler.done:  # a delta of unchanged tensors alone is done with its header
                    self._deliver(assembler.finish(), f"{received} bytes through gRPC")
                    assembler = None
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise  # a deadline just means: subscribe again
        finally:
            self._call.cancel()

    def _mapped(self, chunk: pb.Chunk) -> WeightVersion:
        header = chunk.header
        try:
            buffer = shared_memory.map_readonly(chunk.shared_memory_path, sum(t.nbytes for t in header.tensors))
        except OSError as exc:  # superseded and removed before we got to it: the next call brings the newer one
            raise ChecksumError(f"version {header.version} in shared memory: {exc}") from exc
        self.stats.shared_memory += 1
        return verified_mapping(header, buffer, chunk.shared_memory_xxh3)

    def _deliver(self, version: WeightVersion, how: str) -> None:
        log.info("%s: weight version %d from %s, %s", self.subscriber_id, version.version, self.target, how)
        with self._arrived:
            self._newest = version
            self.stats.versions += 1
            self.stats.received.append(version.version)
            self._arrived.notify_all()
