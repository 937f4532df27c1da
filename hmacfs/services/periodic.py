"""A background thread that runs one job every so many seconds, until it is stopped.

Strategy: the janitor, the worker tuner and the Redis health check each need the same loop:
wait out the interval (or a wake-up), stop promptly when told, and survive a failing run
(log it, try again next time) so a background job never takes the server down with it.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger("hmacfs")


def run_every(interval: float, job: Callable[[], None], name: str, stop: threading.Event,
              wake: Optional[threading.Event] = None, failure: str = "background job failed") -> threading.Thread:
    """Start a daemon thread that runs `job` every `interval` seconds (sooner when `wake` is set)
    until `stop` is set (set `wake` too, to stop at once); a run that raises is logged as
    `failure` and the next one goes ahead."""
    waiter = wake or stop

    def loop() -> None:
        while True:
            waiter.wait(interval)
            if wake is not None:
                wake.clear()
            if stop.is_set():
                return
            try:
                job()
            except Exception:
                log.exception("%s; trying again in %.0fs", failure, interval)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
