"""WeightSyncServer: the trainer publishes policy versions; searchers subscribe and get them pushed.

publish() copies the weights into a fresh staging buffer and returns: that copy is all the training
loop waits for. Hashing, delta encoding and sending happen on other threads, and a version becomes
visible only once sealed, so no subscriber ever sees one half-written. Each Subscribe call sends the
newest version it has not sent, so a slow subscriber skips superseded versions instead of queueing
them. Every version is also announced on the compacted policy-versions topic.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent import futures

import grpc
import torch

from ops.config import TbaConfig
from ops.grpc_security import TokenAuth, server_credentials, tokens
from schemas import weight_sync_pb2 as pb
from schemas import weight_sync_pb2_grpc as pb_grpc
from schemas.weights import EncodedVersion, VersionAssembler, WeightVersion, chunks, encode, seal, stage

log = logging.getLogger(__name__)


class WeightSyncServer(pb_grpc.WeightSyncServicer):
    def __init__(self, cfg: TbaConfig, announce: bool = True):
        self.cfg = cfg
        self.wcfg = cfg.weights
        self._versions: OrderedDict[int, WeightVersion] = OrderedDict()  # newest last, keep_versions of them
        self._encoded: dict[tuple[int, int], EncodedVersion] = {}  # (version, base) -> wire form
        self._changed = threading.Condition()
        self._encode_lock = threading.Lock()
        self._release_lock = threading.Lock()  # releases, announcements included, happen one at a time, in order
        self._next_version = 0
        self._server: grpc.Server | None = None
        self._announcer = _Announcer(cfg) if announce else None
        self._sealing: list[threading.Thread] = []
        self.port: int | None = None

    # -- trainer side -----------------------------------------------------------------------------

    def publish(
        self, state_dict: dict[str, torch.Tensor], step: int, model_id: str = "", version: int | None = None
    ) -> int:
        """Stage the weights (a copy, on the caller's time) and release them in the background.

        version defaults to one more than the last; returns it. wait_published(version) blocks until
        subscribers can get it.
        """
        specs, buffer = stage(state_dict)
        with self._changed:
            if version is None:
                version = self._next_version
            self._next_version = max(self._next_version, version + 1)
        thread = threading.Thread(target=self._seal, args=(specs, buffer, version, step, model_id), daemon=True)
        thread.start()
        self._sealing = [t for t in self._sealing if t.is_alive()] + [thread]
        return version

    def _seal(self, specs, buffer, version: int, step: int, model_id: str) -> None:
        self.release(seal(specs, buffer, version, step, model_id))

    def release(self, version: WeightVersion) -> None:
        """Make a sealed version the newest one (older ones that arrive late are dropped)."""
        with self._release_lock:
            with self._changed:
                if self._versions and version.version <= next(reversed(self._versions)):
                    return
                self._versions[version.version] = version
                self._next_version = max(self._next_version, version.version + 1)
                while len(self._versions) > self.wcfg.keep_versions:
                    old, _ = self._versions.popitem(last=False)
                    self._encoded = {k: v for k, v in self._encoded.items() if old not in k}
                self._changed.notify_all()
            if self._announcer is not None:
                self._announcer.announce(version)

    def wait_published(self, version: int, timeout_s: float = 60) -> WeightVersion:
        with self._changed:
            ok = self._changed.wait_for(lambda: self.latest is not None and self.latest.version >= version, timeout_s)
        if not ok:
            raise TimeoutError(f"version {version} was not released within {timeout_s}s")
        return self._versions.get(version) or self.latest

    @property
    def latest(self) -> WeightVersion | None:
        return self._versions[next(reversed(self._versions))] if self._versions else None

    def encoded(self, version: WeightVersion, base: WeightVersion | None) -> EncodedVersion:
        """The wire form for (version, base), computed once however many subscribers need it."""
        key = (version.version, base.version if base is not None else -1)
        with self._encode_lock:
            if key not in self._encoded:
                self._encoded[key] = encode(version, base, self.wcfg.delta_zstd_level)
            return self._encoded[key]

    # -- gRPC ---------------------------------------------------------------------------------------

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.ServicerContext):
        have = request.have_version
        margin = 1.0  # end the stream cleanly before the client's deadline
        while context.is_active():
            remaining = context.time_remaining()
            if remaining is not None and remaining < margin:
                return
            with self._changed:
                self._changed.wait_for(
                    lambda have=have: self.latest is not None and self.latest.version > have,
                    timeout=min(1.0, remaining - margin) if remaining is not None else 1.0,
                )
                newest = self.latest
                base = self._versions.get(have) if request.delta_ok and self.wcfg.delta else None
            if newest is None or newest.version <= have:
                continue
            for chunk in chunks(self.encoded(newest, base), self.wcfg.chunk_bytes):
                if not context.is_active():
                    return
                yield chunk
            have = newest.version

    def Publish(self, request_iterator, context: grpc.ServicerContext) -> pb.PublishReply:
        assembler = None
        for chunk in request_iterator:
            if chunk.HasField("header"):
                base = self._versions.get(chunk.header.base_version) if chunk.header.base_version >= 0 else None
                try:
                    assembler = VersionAssembler(chunk.header, base)
                except Exception as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                latest = self.latest
                if latest is not None and chunk.header.version <= latest.version:
                    context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"version {chunk.header.version} is not newer than {latest.version}",
                    )
            elif assembler is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must carry the version header")
            else:
                assembler.add(chunk)
        if assembler is None or not assembler.done:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before the version was complete")
        try:
            version = assembler.finish()
        except Exception as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        self.release(version)
        return pb.PublishReply(version=version.version)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> int:
        """Serve on weights.host:weights.port (0: a free port); returns the port."""
        publish_token, subscribe_token = tokens(self.wcfg)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.wcfg.max_subscribers + 4),
            interceptors=[TokenAuth(publish_token, subscribe_token)],
            options=[
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ("grpc.max_send_message_length", 8 * 1024 * 1024),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ],
        )
        pb_grpc.add_WeightSyncServicer_to_server(self, self._server)
        address = f"{self.wcfg.host}:{self.wcfg.port}"
        creds = server_credentials(self.wcfg)
        self.port = self._server.add_secure_port(address, creds) if creds else self._server.add_insecure_port(address)
        self._server.start()
        return self.port

    @property
    def target(self) -> str:
        return f"{self.wcfg.host}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        for t in self._sealing:
            t.join()
        if self._announcer is not None:
            self._announcer.close()

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


class _Announcer:
    """Puts each released version on the compacted policy-versions topic (key "policy")."""

    def __init__(self, cfg: TbaConfig):
        self.cfg = cfg
        self._producer = None
        self._codec = None

    def announce(self, version: WeightVersion) -> None:
        from ops import kafka_clients
        from ops.topics import topic_names
        from schemas.records import PolicyVersionCodec

        try:
            if self._producer is None:
                self._codec = PolicyVersionCodec(_store(self.cfg))
                self._producer = kafka_clients.producer(self.cfg, linger_ms=0)
            value = self._codec.encode_version(version)
            self._producer.send(topic_names(self.cfg).policy_versions, key=b"policy", value=value)
        except Exception as exc:  # the service keeps serving weights when Kafka is away
            log.warning("could not announce policy version %d on Kafka: %s", version.version, exc)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=self.cfg.kafka.client_timeout_s)
            self._producer.close()


def _store(cfg: TbaConfig):
    from schemas.codec import SchemaStore

    return SchemaStore(cfg)


def publish_remote(
    cfg: TbaConfig, target: str, state_dict: dict[str, torch.Tensor], version: int, step: int, model_id: str = ""
) -> int:
    """Publish to a WeightSyncServer in another process (`tba weights serve`) with the publish token."""
    from ops.grpc_security import call_metadata, channel

    specs, buffer = stage(state_dict)
    encoded = encode(seal(specs, buffer, version, step, model_id))
    with channel(cfg.weights, target) as ch:
        stub = pb_grpc.WeightSyncStub(ch)
        reply = stub.Publish(
            chunks(encoded, cfg.weights.chunk_bytes),
            timeout=cfg.weights.deadline_s,
            metadata=call_metadata(tokens(cfg.weights)[0]),
        )
    return reply.version


def serve(cfg: TbaConfig, stop: threading.Event) -> None:
    """`tba weights serve`: run the service on its own until stop is set."""
    server = WeightSyncServer(cfg)
    port = server.start()
    print(f"weight sync serving on {cfg.weights.host}:{port}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
