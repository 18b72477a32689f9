"""Version buffers come back for reuse only once nothing can reach their pages."""

import gc

import numpy as np
import torch

from schemas.buffers import allocate

SIZE = 3 * 4096 + 17  # a size no other test allocates


def test_a_buffer_is_reused_only_after_its_last_view_is_gone():
    first = allocate(SIZE)
    first[:] = 7
    address = first.ctypes.data
    view = torch.from_numpy(first)[5:9]  # a tensor view keeps the pages reachable
    del first
    gc.collect()
    other = allocate(SIZE)  # held: a buffer given back would take the pool's one place
    assert other.ctypes.data != address  # not while the view lives
    assert torch.equal(view, torch.full((4,), 7, dtype=torch.uint8))
    del view
    gc.collect()
    again = allocate(SIZE)
    assert again.ctypes.data == address and again.size == SIZE  # the same pages, once unreachable
    assert allocate(0).size == 0 and isinstance(other, np.ndarray)
