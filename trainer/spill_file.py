"""SpillFile: the curated records a trainer has read, appended to a local file, so that reading an evicted
group back is a disk read (microseconds) rather than a Kafka fetch.

Kafka reads sequentially; the sampler reads at random. A fetch for one record costs a round trip
(measured ~4 ms on a 2-core machine with a local broker) and a step of 64 prompts wants ~128 groups
scattered over the whole history. The file is a cache of the topic, not a second source of truth: a
record not in it is read from Kafka (and then kept), and it is unlinked as it is made, so nothing outlives
the process, a kill -9 included.

Layout: each record's value behind a 4-byte length, starting on a 16-byte boundary. Per partition, a
Column of uint32 positions in 16-byte units, plus one (0: not here), indexed by offset - first offset:
4 bytes an offset, control markers and rejected records included, for files of up to 64 GiB.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import threading

import numpy as np

from trainer.columns import Column

log = logging.getLogger(__name__)
LENGTH = struct.Struct("<I")
ALIGN = 16
MAX_BYTES = ALIGN * (2**32 - 2)
RESERVE_BYTES, RESERVE_SHARE = 1 << 30, 0.05  # free space the file never takes: the larger of the two


def free_beyond_reserve(fd: int) -> int:
    """Bytes the file on fd may still take: its disk's free space less the reserve kept for everything else."""
    disk = os.fstatvfs(fd)
    return disk.f_bavail * disk.f_frsize - max(RESERVE_BYTES, int(RESERVE_SHARE * disk.f_blocks * disk.f_frsize))


class SpillFile:
    def __init__(self, directory: str | None, max_bytes: int):
        self._file = tempfile.TemporaryFile(dir=directory, prefix="tba-spill-")
        self.max_bytes = min(max_bytes, MAX_BYTES)
        self.size = 0
        self.full = False
        self._positions: dict[int, tuple[int, Column]] = {}  # partition -> (its first offset, positions)
        self._unflushed = False
        self._lock = threading.Lock()  # a prefetch keeps and reads on its own thread

    def keep(self, records) -> None:
        """Append (partition, offset, value)s: one lock and one write for a whole poll's worth. Stops growing
        at max_bytes, or before the disk's free space falls to the reserve: a cache must never fill a disk."""
        parts = []
        with self._lock:
            room = self.max_bytes - self.size
            if not self.full:
                room = min(room, free_beyond_reserve(self._file.fileno()))
            written = 0
            for partition, offset, value in records:
                padding = -(LENGTH.size + len(value)) % ALIGN
                if self.full or written + LENGTH.size + len(value) + padding > room:
                    if not self.full:
                        limit = "buffer.spill_gb" if room == self.max_bytes - self.size else "the disk's free space"
                        log.warning("the spill file is full (%s, at %.1f GB): groups read from here on are read "
                                    "back from Kafka when evicted", limit, self.size / 1e9)  # fmt: skip
                        self.full = True
                    break
                written += LENGTH.size + len(value) + padding
                first, positions = self._slots(partition, offset)
                i = offset - first
                if i >= positions.size:
                    if i > positions.size:  # offsets not kept: markers, rejected records
                        positions.extend(np.zeros(i - positions.size))
                    positions.append(self.size // ALIGN + 1)
                else:
                    positions.values[i] = self.size // ALIGN + 1
                parts += (LENGTH.pack(len(value)), value, bytes(padding))
                self.size += LENGTH.size + len(value) + padding
            if parts:
                self._file.write(b"".join(parts))
                self._unflushed = True

    def get(self, partition: int, offset: int) -> bytes | None:
        with self._lock:
            first, positions = self._positions.get(partition, (0, None))
            i = offset - first
            if positions is None or not 0 <= i < positions.size or positions.values[i] == 0:
                return None
            if self._unflushed:
                self._file.flush()
                self._unflushed = False
            position = (int(positions.values[i]) - 1) * ALIGN
        fd = self._file.fileno()
        (length,) = LENGTH.unpack(os.pread(fd, LENGTH.size, position))
        return os.pread(fd, length, position + LENGTH.size)

    def _slots(self, partition: int, offset: int) -> tuple[int, Column]:
        first, positions = self._positions.get(partition, (offset, None))
        if positions is None or offset < first:  # a first record, or one older than any kept (after a restore)
            older = Column(np.uint32)
            older.extend(np.zeros(first - offset))
            if positions is not None:
                older.extend(positions.values)
            first, positions = self._positions[partition] = (offset, older)
        return first, positions

    @property
    def nbytes(self) -> int:
        return sum(positions.nbytes for _, positions in self._positions.values())

    def close(self) -> None:
        self._file.close()
