"""Column: an append-only numpy array, the replay buffer's unit of memory (one per field of its index)."""

from __future__ import annotations

import numpy as np


class Column:
    """An append-only numpy array that grows its capacity by a quarter when full."""

    def __init__(self, dtype, capacity: int = 1024):
        self._data = np.empty(capacity, dtype)
        self.size = 0

    @classmethod
    def of(cls, values: np.ndarray) -> Column:
        column = cls(values.dtype, max(1024, values.size))
        column.extend(values)
        return column

    def extend(self, values) -> None:
        values = np.asarray(values, self._data.dtype).ravel()
        end = self.size + values.size
        if end > self._data.size:
            # grow by 1.25x, not 2x: the index is the buffer's memory, slack included
            grown = np.empty(max(end, self._data.size + self._data.size // 4), self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = values
        self.size = end

    def append(self, value) -> None:
        if self.size < self._data.size:  # the common case, without extend's array conversion
            self._data[self.size] = value
            self.size += 1
        else:
            self.extend((value,))

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]

    @property
    def nbytes(self) -> int:
        return self._data.nbytes
