"""How `tba` commands log: our lines at INFO (TBA_LOG_LEVEL), kafka-python's as debug lines (--verbose).

While a broker starts, or a role starts before Kafka answers, kafka-python logs every refused
connection as an ERROR and every retry as a WARNING: a flood that says nothing the one line of ours
(what is being waited for) does not.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

LIBRARY = "kafka"


class LibraryLinesAtDebug(logging.Filter):
    """On a handler: records of the kafka.* loggers count as DEBUG, shown only when the root logger shows DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] != LIBRARY:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(verbose: bool = False, handler: logging.Handler | None = None, replace: bool = False) -> None:
    """Log to stderr (or to handler). replace: even where logging is set up already (the live view's handler)."""
    handler = handler or logging.StreamHandler()
    handler.addFilter(LibraryLinesAtDebug())
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    level = "DEBUG" if verbose else os.environ.get("TBA_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, handlers=[handler], force=replace)
    logging.getLogger(LIBRARY).setLevel(logging.INFO)  # its own DEBUG is every request: not even --verbose


def rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Past max_bytes, path moves to path.1 (.1 to .2, ...; the oldest of `backups` goes) and is emptied; True if so.

    Copy, then truncate, as logrotate's copytruncate does: the role writing it keeps its file open in append
    mode and goes on writing at the new end, with no signal to reopen. A line written between the copy and
    the truncation is lost, which a log may afford and a role's restart would not.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups, 1, -1):
        older = path.with_name(f"{path.name}.{i - 1}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i}"))
    if backups:
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True
