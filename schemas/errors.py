"""The root of every error tba-stream raises on purpose, and the contract's own: bytes that are not a record.

They live with the contract, the lowest layer, so that everything above can raise and catch them.
"""


class TbaError(Exception):
    """Root of every error tba-stream raises on purpose."""


class DecodeError(TbaError):
    """Bytes that are not a readable record; `reason` goes to the dead-letter topic."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
