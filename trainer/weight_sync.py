"""The weight-sync service: the trainer publishes policy versions; searchers subscribe and get them pushed.

WeightSyncServicer answers the gRPC calls of schemas/weight_sync.proto from a VersionStore
(trainer/weight_versions.py, which holds, seals, encodes and announces the versions); WeightSyncServer
runs it. Each Subscribe call sends the newest version it has not sent, so a slow subscriber skips
superseded versions instead of queueing them.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import torch

from ops import shared_memory
from ops.config import TbaConfig
from ops.grpc_security import TokenAuth, server_credentials, tokens
from schemas import chunk_wire
from schemas import weight_sync_pb2 as pb
from schemas import weight_sync_pb2_grpc as pb_grpc
from schemas.weights import VersionAssembler, WeightVersion, chunks, encode, seal, stage, version_header
from trainer.weight_versions import VersionStore

log = logging.getLogger(__name__)


class WeightSyncServicer(pb_grpc.WeightSyncServicer):
    """Subscribe and Publish, served from a VersionStore."""

    def __init__(self, store: VersionStore, wcfg):
        self.store = store
        self.wcfg = wcfg

    def same_host(self, request: pb.SubscribeRequest) -> bool:
        """Whether this subscriber maps versions from shared memory rather than receiving the bytes."""
        mode = self.wcfg.shared_memory
        if mode == "never" or not request.host_id:
            return False
        return mode == "always" or request.host_id == shared_memory.host_id()

    def Subscribe(self, request: pb.SubscribeRequest, context: grpc.ServicerContext):
        have = request.have_version
        local = self.same_host(request)
        margin = 1.0  # end the stream cleanly before the client's deadline
        while context.is_active():
            remaining = context.time_remaining()
            if remaining is not None and remaining < margin:
                return
            with self.store.changed:
                self.store.changed.wait_for(
                    lambda have=have: self.store.latest is not None and self.store.latest.version > have,
                    timeout=min(1.0, remaining - margin) if remaining is not None else 1.0,
                )
                newest = self.store.latest
                base = self.store.versions.get(have) if request.delta_ok and self.wcfg.delta else None
            if newest is None or newest.version <= have:
                continue
            if local:  # the header alone, and where the bytes are
                try:
                    path, xxh3 = self.store.shared(newest)
                except OSError as exc:  # /dev/shm full or too small (containers): send the bytes instead
                    log.warning("cannot share version %d in memory (%s): sending it through gRPC", newest.version, exc)
                    local = False
                else:
                    header = version_header(newest)
                    yield pb.Chunk(header=header, shared_memory_path=str(path), shared_memory_xxh3=xxh3)
                    have = newest.version
                    continue
            after = request.xxh3_ok and request.checksum_after_data  # sent while the store still hashes
            checksum = "" if after else "xxh3" if request.xxh3_ok else "sha256"
            for chunk in chunks(self.store.encoded(newest, base, checksum), self.wcfg.chunk_bytes):
                if not context.is_active():
                    return
                yield chunk
            if after:
                yield pb.Chunk(xxh3=newest.xxh3)
            have = newest.version

    def Publish(self, request_iterator, context: grpc.ServicerContext) -> pb.PublishReply:
        assembler = None
        for chunk in request_iterator:
            if isinstance(chunk, pb.Chunk) and chunk.HasField("header"):
                base = self.store.versions.get(chunk.header.base_version) if chunk.header.base_version >= 0 else None
                try:
                    assembler = VersionAssembler(chunk.header, base)
                except Exception as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                latest = self.store.latest
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
        self.store.release(version)
        return pb.PublishReply(version=version.version)


class WeightSyncServer:
    """The service in this process: a VersionStore the trainer publishes to, served over gRPC."""

    def __init__(self, cfg: TbaConfig, announce: bool = True):
        self.cfg = cfg
        self.wcfg = cfg.weights
        self.store = VersionStore(cfg, announce)
        self._server: grpc.Server | None = None
        self.port: int | None = None
        # the trainer's side is the store's
        self.publish, self.release, self.wait_published = (
            self.store.publish,
            self.store.release,
            self.store.wait_published,
        )

    @property
    def latest(self) -> WeightVersion | None:
        return self.store.latest

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
        chunk_wire.add_servicer(WeightSyncServicer(self.store, self.wcfg), self._server)
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
        self.store.close()

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


def publish_remote(
    cfg: TbaConfig, target: str, state_dict: dict[str, torch.Tensor], version: int, step: int, model_id: str = ""
) -> int:
    """Publish to a WeightSyncServer in another process (`tba weights serve`) with the publish token."""
    from ops.grpc_security import call_metadata, channel

    specs, buffer = stage(state_dict)
    encoded = encode(seal(specs, buffer, version, step, model_id))
    with channel(cfg.weights, target) as ch:
        stub = chunk_wire.WeightSyncStub(ch)
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
