"""The upload worker pool's admission rules, with real threads (services/workers.py).

Why: the pool is what a slow-body attack aims at. The integration test (test_slowloris.py)
shows a normal client still gets through; these pin the rules behind it one by one: the
last free workers go only to addresses holding none, a queued client that went away leaves
at once, and the plain limits (queue full: 503) still hold.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest

from hmacfs.errors import HTTPError
from hmacfs.services.workers import GONE_CHECK, UploadGate


def hold(gate: UploadGate, owner: str, stack: ExitStack) -> None:
    stack.enter_context(gate.slot(10, owner))


def test_the_last_free_workers_go_to_addresses_holding_none() -> None:
    gate = UploadGate(4, 10)  # reserve: 1
    assert gate.reserve == 1
    with ExitStack() as stack:
        for _ in range(3):
            hold(gate, "10.0.0.1", stack)  # one address takes all but the reserve
        took = threading.Event()

        def fourth_from_the_same_address() -> None:
            with gate.slot(10, "10.0.0.1"):
                took.set()

        waiter = threading.Thread(target=fourth_from_the_same_address, daemon=True)
        waiter.start()
        assert not took.wait(0.3), "an address holding workers took the reserved one"
        assert gate.waiting == 1
        started = time.monotonic()
        with gate.slot(10, "10.0.0.2"):  # another address: at once
            assert time.monotonic() - started < 0.2
            assert gate.active == 4
        # the reserve is free again, but still only for addresses holding none
        assert not took.wait(0.3)
        stack.close()  # the first address lets go: now its queued upload proceeds
        assert took.wait(2)
        waiter.join(2)
    assert gate.active == 0 and gate.waiting == 0


def test_a_queued_client_that_went_away_leaves_the_queue() -> None:
    gate = UploadGate(1, 10)
    gone = threading.Event()
    outcome: dict[str, object] = {}

    def queued() -> None:
        try:
            with gate.slot(10, "10.0.0.2", gone.is_set):
                outcome["got"] = True
        except ConnectionAbortedError as e:
            outcome["error"] = e

    with gate.slot(10, "10.0.0.1"):
        thread = threading.Thread(target=queued, daemon=True)
        thread.start()
        time.sleep(0.2)
        assert gate.waiting == 1
        gone.set()
        thread.join(GONE_CHECK + 2)
        assert isinstance(outcome.get("error"), ConnectionAbortedError), outcome
        assert gate.waiting == 0  # its connection is no longer counted as waiting
    assert gate.active == 0


def test_a_full_queue_is_503_and_no_owner_means_no_reserve() -> None:
    gate = UploadGate(2, 0)  # no queue; reserve 0 with two workers
    with ExitStack() as stack:
        hold(gate, "10.0.0.1", stack)
        with gate.slot(10, None):  # a Unix-socket client: counted by no address
            with pytest.raises(HTTPError) as err, gate.slot(10, "10.0.0.3"):
                pass
            assert err.value.status == 503 and err.value.headers.get("Retry-After")
