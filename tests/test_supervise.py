"""hil_protocol.supervise: a background task that dies is restarted with backoff and reported while down."""

from __future__ import annotations

import asyncio

from hil_protocol.supervise import Supervisor


def stop(name: str) -> None:
    for task in asyncio.all_tasks():
        if task.get_name() == name:
            task.cancel()


async def test_a_crashing_task_is_restarted_and_reported() -> None:
    runs = 0
    third_run = asyncio.Event()
    restarted: list[str] = []

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"boom {runs}")
        third_run.set()
        await asyncio.Event().wait()

    supervisor = Supervisor(min_delay=0.01, max_delay=0.02, stable_after=60, flapping=3, on_restart=restarted.append)
    async with asyncio.TaskGroup() as group:
        supervisor.start(group, "flaky", flaky)
        await asyncio.sleep(0)
        assert any("flaky is down" in p and "boom 1" in p for p in supervisor.problems())
        await asyncio.wait_for(third_run.wait(), 5)
        assert supervisor.problems() == []  # running again after two crashes: not yet flapping
        assert restarted == ["flaky", "flaky"]
        assert supervisor.tasks["flaky"].restarts == 2
        stop("flaky")


async def test_a_task_that_returns_is_restarted_and_flapping_is_a_problem() -> None:
    calls = 0
    fifth = asyncio.Event()

    async def quits() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            fifth.set()

    supervisor = Supervisor(min_delay=0.001, max_delay=0.001, stable_after=60, flapping=3)
    async with asyncio.TaskGroup() as group:
        supervisor.start(group, "quits", quits)
        await asyncio.wait_for(fifth.wait(), 5)
        assert any("quits" in p for p in supervisor.problems())
        stop("quits")


async def test_a_task_cancelled_as_it_fails_is_not_restarted() -> None:
    # Python 3.11's TaskGroup raises a child's error instead of the cancellation when both happen in one step:
    # the supervisor must still see a shutdown, not a crash to restart.
    fail = asyncio.Event()
    runs = 0

    async def child() -> None:
        await fail.wait()
        if runs == 1:
            raise ConnectionError("lost")

    async def run() -> None:
        nonlocal runs
        runs += 1
        async with asyncio.TaskGroup() as inner:
            inner.create_task(child())
            await asyncio.Event().wait()

    async def shutdown() -> None:
        supervisor = Supervisor(min_delay=0.001, max_delay=0.001)
        async with asyncio.TaskGroup() as group:
            supervisor.start(group, "run", run)
            await asyncio.sleep(0.01)
            fail.set()
            supervisor.cancel()

    await asyncio.wait_for(shutdown(), 2)  # the group ends: nothing restarted the task
    assert runs == 1
