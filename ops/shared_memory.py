"""Weight versions in shared memory, for subscribers on the publisher's own host.

The weight service stages a version once into a file under /dev/shm (RAM, not disk), keeps a
read-only mapping of it as the version's buffer, and tells same-host subscribers its path; each maps
the same pages instead of receiving the bytes through gRPC. A file is removed when its version is
superseded and when the service stops: whoever mapped it keeps the mapping, and the kernel frees the
memory when the last one goes. Names carry the writer's pid, so what a killed service left behind is
removed when the next one starts.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PREFIX = "tba-weights-"
_reservations = itertools.count()


def directory() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def host_id() -> str:
    """The same for every process that sees the same shared-memory files, different elsewhere: the running
    kernel (boot id), the host's name, and the device of the directory the files are in.

    The device tells apart processes of one kernel that have each their own /dev/shm (containers, or
    the simulated hosts of tests/netns.py): one could not open the other's files. A network namespace
    alone is no reason to differ: its processes open the same files, and the bytes need no network.
    """
    try:
        device = os.stat(directory()).st_dev
    except OSError:
        device = 0
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}@{socket.gethostname()}:{device:x}"


def write(parts: Iterable[np.ndarray], tag: str) -> Path:
    """A new file holding the parts' bytes back to back, complete before its final name appears.

    Plain writes, not a mapping: tmpfs allocates and fills its pages in one pass (~2 GB/s here),
    where faulting a fresh shared mapping in page by page costs about twice that.
    """
    path = directory() / f"{PREFIX}{os.getpid()}-{tag}"
    partial = path.with_name(path.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:  # one write() moves at most ~2 GiB
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except OSError:
        partial.unlink(missing_ok=True)  # a full /dev/shm keeps nothing half-written
        raise
    os.replace(partial, path)
    return path


class Reservation:
    """A file of nbytes under its writer's name with a .partial suffix, its pages allocated ahead of
    need and mapped writable: a version is then staged into it with one memcpy (~0.04 s for 270 MB
    here), where a new file costs the kernel a zeroed page per 4 KiB first (~0.17 s). Made in the
    background after a release, it takes that cost off the next publish."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        # a name of its own: publishes seal on threads of their own, and two reservations of one name would
        # truncate each other's mapped file (SIGBUS on the next write into the first)
        self.partial = directory() / f"{PREFIX}{os.getpid()}-next-{next(_reservations)}.partial"
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC here, not SIGBUS when the pages are first touched
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self.buffer = np.frombuffer(mmap.mmap(fd, nbytes, flags=flags), np.uint8)
        except OSError:
            self.partial.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def name(self, tag: str) -> Path:
        """Give the written file its final name: readers may map it from now on."""
        path = directory() / f"{PREFIX}{os.getpid()}-{tag}"
        os.replace(self.partial, path)
        return path

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)


def map_readonly(path: str | Path, nbytes: int) -> np.ndarray:
    """The file's first nbytes as a read-only uint8 array, shared with every other reader of it."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < nbytes:
            raise OSError(f"{path}: shorter than the {nbytes} bytes announced")
        if nbytes == 0:
            return np.empty(0, np.uint8)
        # populated up front: one call instead of a page fault per 4 KiB when the bytes are first read
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(f.fileno(), nbytes, prot=mmap.PROT_READ, flags=flags), np.uint8)


def remove_orphans() -> int:
    """Remove the files of writers that are no longer running; how many were removed."""
    removed = 0
    for path in directory().glob(f"{PREFIX}*"):
        try:
            pid = int(path.name.removeprefix(PREFIX).split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
