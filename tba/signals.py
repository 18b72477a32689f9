"""How a long-running `tba` command hears SIGTERM and Ctrl-C."""

from __future__ import annotations

import signal
import threading


class Stop(threading.Event):
    """Set by the first SIGTERM / Ctrl-C: finish the unit of work and stop. A second one also sets
    `hurry`: whoever stops others (the supervisor) stops waiting for them."""

    def __init__(self) -> None:
        super().__init__()
        self.hurry = threading.Event()


def stop_on_signals() -> Stop:
    stop = Stop()

    def on_signal(*_) -> None:
        if stop.is_set():
            stop.hurry.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
