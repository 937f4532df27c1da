"""Worker auto-adjust (services/workers.py): the sizing rule, run-time resize, the tuner.

Why: `plan_workers` decides how much memory the pool may hold on hosts we never see (a 256 MiB
container, a 64-core box), so it is a pure function pinned here case by case; `resize` runs
while uploads hold and wait for slots, so it is tested with real threads.
"""
from __future__ import annotations

import threading
import time
from contextlib import ExitStack

from hmacfs.services.workers import (
    MAX_WORKERS,
    MIN_WORKERS,
    Resources,
    UploadGate,
    WorkerTuner,
    auto_workers,
    parse_cpu_max,
    parse_meminfo,
    parse_memory_max,
    plan_workers,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_cpus_decide_when_memory_is_plenty() -> None:
    plan = plan_workers(Resources(2, 16 * GiB))
    assert plan.start == 8
    assert plan.ceiling == MAX_WORKERS  # 16 GiB / 4 / 2 MiB = 2048, capped
    assert plan_workers(Resources(64, 64 * GiB)).start == 64  # the start ceiling
    assert auto_workers(1) == MIN_WORKERS


def test_memory_bounds_the_pool() -> None:
    plan = plan_workers(Resources(16, 48 * MiB))  # 48 MiB / 4 / 2 MiB = 6
    assert (plan.start, plan.ceiling, plan.memory_bound) == (6, 6, 6)
    # the lower of MemAvailable and the cgroup's room counts
    plan = plan_workers(Resources(16, 16 * GiB, cgroup_memory=80 * MiB))
    assert (plan.start, plan.ceiling) == (10, 10)
    # never below the floor, even when memory is scarce
    assert plan_workers(Resources(8, 1 * MiB)).start == MIN_WORKERS


def test_a_cgroup_cpu_quota_counts_when_lower() -> None:
    assert plan_workers(Resources(32, 16 * GiB, cgroup_cpus=1.5)).start == 8  # ceil(1.5) * 4
    assert plan_workers(Resources(2, 16 * GiB, cgroup_cpus=8.0)).start == 8


def test_parsers_of_proc_and_cgroup_files() -> None:
    assert parse_meminfo("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2 * MiB
    assert parse_meminfo("MemTotal: 100 kB\n") is None
    assert parse_memory_max("max\n") is None
    assert parse_memory_max("104857600\n", "4194304\n") == 100 * MiB - 4 * MiB
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("garbage") is None


def test_resize_grows_and_wakes_waiters() -> None:
    gate = UploadGate(2, 10)
    took = threading.Semaphore(0)
    with ExitStack() as stack:
        for i in range(2):
            stack.enter_context(gate.slot(10, f"10.0.0.{i}"))

        def waiter(n: int) -> None:
            with gate.slot(10, f"10.0.1.{n}"):
                took.release()
                time.sleep(0.3)

        threads = [threading.Thread(target=waiter, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 2
        while gate.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.waiting == 3 and gate.queued_for() >= 0
        gate.resize(5)
        assert (gate.workers, gate.reserve) == (5, 1)
        for _ in range(3):
            assert took.acquire(timeout=2), "a waiter was not woken by the growth"
        assert gate.active == 5
        for t in threads:
            t.join(2)
    assert gate.active == 0 and gate.waiting == 0 and gate.queued_since is None


def test_shrinking_takes_no_slot_away_and_holds_new_ones_back() -> None:
    gate = UploadGate(8, 10)
    with ExitStack() as stack:
        for i in range(6):
            stack.enter_context(gate.slot(None, f"10.0.0.{i}"))
        gate.resize(4)
        assert (gate.workers, gate.reserve, gate.active) == (4, 1, 6)
        got = threading.Event()

        def late() -> None:
            with gate.slot(10, "10.0.9.9"):
                got.set()

        t = threading.Thread(target=late, daemon=True)
        t.start()
        assert not got.wait(0.3)  # 6 held > 4: it waits
        stack.close()
        assert got.wait(2)
        t.join(2)
    assert len(gate._buffers) <= 4  # the pooled buffers follow the size down


def test_resize_under_load_from_many_threads() -> None:
    """Uploads come and go while another thread resizes the pool: the count never goes
    negative, every upload finishes, and the last size sticks."""
    gate = UploadGate(4, 1000)
    peak = [0]
    lock = threading.Lock()
    done = threading.Event()

    def upload(n: int) -> None:
        for _ in range(20):
            with gate.slot(10, f"10.0.{n}.1"):
                with lock:
                    peak[0] = max(peak[0], gate.active)
                time.sleep(0.001)

    def resizer() -> None:
        sizes = [1, 7, 2, 12, 3]
        i = 0
        while not done.is_set():
            gate.resize(sizes[i % len(sizes)])
            i += 1
            time.sleep(0.002)

    r = threading.Thread(target=resizer, daemon=True)
    r.start()
    workers = [threading.Thread(target=upload, args=(n,), daemon=True) for n in range(16)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(20)
    done.set()
    r.join(2)
    gate.resize(6)
    assert not any(t.is_alive() for t in workers)
    assert gate.active == 0 and gate.waiting == 0
    assert peak[0] <= 12 and gate.workers == 6 and gate.reserve == 1


def test_tuner_grows_under_sustained_queueing_and_shrinks_when_idle() -> None:
    gate = UploadGate(1, 100)
    tuner = WorkerTuner(gate, True, resources=lambda: Resources(1, 40 * MiB), grow_after=5, shrink_after=60)
    assert (gate.workers, tuner.plan.ceiling) == (4, 5)  # 40 MiB / 4 / 2 MiB = 5
    with ExitStack() as stack:
        for i in range(4):
            stack.enter_context(gate.slot(10, f"10.0.0.{i}"))
        def queued() -> None:
            with gate.slot(10, "10.0.1.1"):
                pass

        t = threading.Thread(target=queued, daemon=True)
        t.start()
        deadline = time.monotonic() + 2
        while not gate.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.monotonic()
        assert tuner.step(now + 1) is None  # queued, but not for long
        assert tuner.step(now + 6) == 5     # sustained: a step up
        assert tuner.step(now + 20) is None  # at the bound
        t.join(2)
    now = time.monotonic()
    assert tuner.step(now) is None           # idle starts counting
    assert tuner.step(now + 61) == 4         # idle long enough: back to the start size
    assert tuner.step(now + 200) is None


def test_tuner_off_uses_numworkers_exactly_and_on_reload() -> None:
    gate = UploadGate(1, 1)
    tuner = WorkerTuner(gate, False, fixed=3, queue_size=7)
    assert (gate.workers, gate.queue_size) == (3, 7)
    assert tuner.step() is None
    assert tuner.configure(False, 9, 11) == 9 and (gate.workers, gate.queue_size) == (9, 11)
    assert tuner.configure(True, 9, 11) >= MIN_WORKERS and tuner.plan is not None
