"""Flat byte buffers for weight versions, reused once nothing refers to them.

A version is one contiguous buffer of a few hundred MB to several GB, and every version of a job has
the same size. A fresh buffer costs the kernel a zeroed page per 4 KiB (~0.07 s for 270 MB with
MAP_POPULATE, ~0.9 s faulted in page by page on a VM), about twice the copy that fills it. So a buffer
goes back to a pool when the last array, view, tensor or memoryview of it is gone, and the next
version of that size gets the same pages.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

# one spare a size: a store drops its oldest version as it releases a new one, a subscriber its last as
# the next arrives, so one buffer waiting is enough for the next; more would only hold memory (a 7B
# model's bf16 version is 14 GB)
KEEP_PER_SIZE = 1

_pool: dict[int, list[mmap.mmap]] = {}
_lock = threading.Lock()


def allocate(nbytes: int) -> np.ndarray:
    """A (nbytes,) uint8 buffer with its pages mapped: a pooled one of that size, else a new one.

    Its contents are undefined: the caller writes every byte.
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    with _lock:
        pages = _pool.get(nbytes, []).pop() if _pool.get(nbytes) else None
    if pages is None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        pages = mmap.mmap(-1, nbytes, flags=flags)
    buffer = np.frombuffer(pages, np.uint8)
    # numpy views, torch.from_numpy tensors and memoryviews all keep this array alive: when it goes,
    # nothing can reach the pages any more
    weakref.finalize(buffer, _give_back, pages)
    return buffer


def _give_back(pages: mmap.mmap) -> None:
    with _lock:
        kept = _pool.setdefault(len(pages), [])
        if len(kept) < KEEP_PER_SIZE:
            kept.append(pages)
    # else dropped: the pages are unmapped once the dying array lets go of them
