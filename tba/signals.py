"""How a long-running `tba` command hears SIGTERM and Ctrl-C."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading

log = logging.getLogger(__name__)


class Stop(threading.Event):
    """Set by the first SIGTERM / Ctrl-C: finish the unit of work and stop. A second one also sets
    `hurry`: whoever stops others (the supervisor) stops waiting for them."""

    def __init__(self) -> None:
        super().__init__()
        self.hurry = threading.Event()


def stop_on_signals() -> Stop:
    stop = Stop()
    # The handler only queues the signal (SimpleQueue.put is safe in a handler); a thread sets the events.
    # Event.set takes a lock: a signal arriving inside another handler's set waited on it forever.
    heard: queue.SimpleQueue = queue.SimpleQueue()

    def relay() -> None:
        while True:
            heard.get()
            if stop.is_set():
                stop.hurry.set()
            stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: heard.put(None))
    return stop


def exit_unfinished_after(stop: Stop, seconds: float, what: str, left: str) -> None:
    """Once stop is set, give the work in hand `seconds` (a second signal: none), then end the process. For
    a role whose unfinished work is safe to drop, so that it stops in bounded time whatever Kafka does."""

    def watch() -> None:
        stop.wait()
        stop.hurry.wait(seconds)
        log.warning("%s still busy %.0fs after the stop (Kafka not answering?): exiting; %s", what, seconds, left)
        os._exit(1)

    threading.Thread(target=watch, name="exit-unfinished", daemon=True).start()
