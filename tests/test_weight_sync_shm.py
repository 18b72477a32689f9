"""Weight versions through shared memory for subscribers on the service's host (real gRPC, loopback)."""

import contextlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ops import shared_memory
from ops.config import with_overrides
from producers.weight_subscriber import WeightSubscriber
from schemas.weights import ChecksumError, verified_mapping, version_header
from tests.tiny_models import tiny_llama
from trainer.weight_sync import WeightSyncServer


def files_of_this_process() -> set[str]:
    return {p.name for p in shared_memory.directory().glob(f"{shared_memory.PREFIX}{os.getpid()}-*")}


def version_files() -> set[str]:
    """The versions' files, without the one reserved for the next version."""
    return {name for name in files_of_this_process() if not name.endswith(".partial")}


def reserved_inode(nbytes: int, timeout_s: float = 20) -> int:
    """The inode of the file the service reserved for its next version, once allocated in full."""
    deadline = time.monotonic() + timeout_s
    while True:
        pattern = f"{shared_memory.PREFIX}{os.getpid()}-next-*.partial"  # each reservation has a name of its own
        sizes = {}
        for f in shared_memory.directory().glob(pattern):
            with contextlib.suppress(FileNotFoundError):  # renamed as a version was staged into it
                sizes[f.stat().st_ino] = f.stat().st_size
        spares = [inode for inode, size in sizes.items() if size == nbytes]
        if spares:
            (inode,) = spares  # one at a time, once the versions are sealed
            return inode
        assert time.monotonic() < deadline, "no file reserved for the next version"
        time.sleep(0.05)


def serve(cfg, **weights) -> WeightSyncServer:
    server = WeightSyncServer(with_overrides(cfg, weights={"port": 0, "subscription_s": 5, **weights}))
    server.start()
    return server


def test_a_subscriber_on_the_same_host_maps_versions_from_shared_memory(cfg):
    server = serve(cfg)
    subscriber = WeightSubscriber(server.cfg.weights, server.target, "local").start()
    try:
        reserved = None
        for version in (0, 1):
            model = tiny_llama(version)
            server.publish(model.state_dict(), step=version, version=version)
            got = subscriber.wait_for(version, 20)
            assert got.version == version and not got.buffer.flags.writeable
            for name, tensor in got.state_dict().items():
                assert torch.equal(tensor, model.state_dict()[name]), name
            path = shared_memory.directory() / f"{shared_memory.PREFIX}{os.getpid()}-v{version}"
            assert version_files() == {path.name}
            if reserved is not None:  # v1 was staged into the file reserved after v0's release
                assert path.stat().st_ino == reserved
            reserved = reserved_inode(got.nbytes)
        assert subscriber.stats.shared_memory == 2 and subscriber.stats.wire_bytes == 0
        held = subscriber.take().state_dict()  # a mapping outlives its file: v0's is gone, v1's too at stop
    finally:
        subscriber.close()
        server.stop()
    assert files_of_this_process() == set()
    assert torch.equal(held["model.embed_tokens.weight"], tiny_llama(1).state_dict()["model.embed_tokens.weight"])


@pytest.mark.parametrize("side", ["server", "subscriber"])
def test_either_side_can_turn_shared_memory_off(cfg, side):
    server = serve(cfg, shared_memory="never" if side == "server" else "auto")
    wcfg = server.cfg.weights if side == "server" else with_overrides(cfg, weights={"shared_memory": "never"}).weights
    subscriber = WeightSubscriber(wcfg, server.target, "remote-like").start()
    try:
        server.publish(tiny_llama(3).state_dict(), step=0, version=0)
        subscriber.wait_for(0, 20)
        assert subscriber.stats.shared_memory == 0 and subscriber.stats.wire_bytes > 0
        # a service that may share stages each version in shared memory, whoever subscribes
        staged = {f"{shared_memory.PREFIX}{os.getpid()}-v0"} if side == "subscriber" else set()
        assert version_files() == staged
    finally:
        subscriber.close()
        server.stop()


def test_a_killed_services_files_are_removed_when_the_next_one_starts(cfg):
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()  # gone now
    left = shared_memory.directory() / f"{shared_memory.PREFIX}{dead}-v7"
    left.write_bytes(b"\0" * 64)
    server = serve(cfg)
    try:
        assert not left.exists()
    finally:
        server.stop()


def test_bytes_that_do_not_match_the_header_are_refused(cfg):
    server = serve(cfg)
    try:
        server.publish(tiny_llama(4).state_dict(), step=0, version=0)
        version = server.store.wait_published(0)
        header = version_header(version)
        path, xxh3 = server.store.shared(version)
        assert verified_mapping(header, version.buffer, xxh3).version == 0
        corrupted = version.buffer.copy()
        corrupted[10] ^= 0xFF
        with pytest.raises(ChecksumError):
            verified_mapping(header, corrupted, xxh3)
        # staged in shared memory: the service's own buffer is a mapping of the file subscribers map
        assert str(path) in Path("/proc/self/maps").read_text()
        mapped = shared_memory.map_readonly(path, version.nbytes)
        assert np.array_equal(mapped, version.buffer)
        assert verified_mapping(header, mapped, xxh3).digests == version.digests  # sha256 of the same bytes
    finally:
        server.stop()


def test_a_full_shared_memory_falls_back_to_the_stream(cfg, monkeypatch):
    def full(parts, tag):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_memory, "write", full)
    server = serve(cfg)
    subscriber = WeightSubscriber(server.cfg.weights, server.target, "local").start()
    try:
        server.publish(tiny_llama(5).state_dict(), step=0, version=0)
        got = subscriber.wait_for(0, 20)
        assert torch.equal(got.state_dict()["model.norm.weight"], tiny_llama(5).state_dict()["model.norm.weight"])
        assert subscriber.stats.shared_memory == 0 and subscriber.stats.wire_bytes > 0
    finally:
        subscriber.close()
        server.stop()


def test_two_reservations_at_once_have_files_of_their_own():
    """Versions seal on threads of their own, each reserving the next one's file: two of one name truncated
    each other's mapped file, and the trainer died of SIGBUS writing into it (seen in a soak)."""
    first, second = shared_memory.Reservation(1 << 20), shared_memory.Reservation(1 << 20)
    try:
        assert first.partial != second.partial and os.stat(first.partial).st_size == 1 << 20
        first.buffer[:] = 7  # its whole length is still its own
        assert int(first.buffer[-1]) == 7
    finally:
        first.discard()
        second.discard()
