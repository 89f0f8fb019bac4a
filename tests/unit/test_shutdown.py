"""A process told to stop exits: every shutdown step is bounded by one deadline (issue 11)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from grantkey.http.app import shut_down


async def _stubborn(release: asyncio.Event) -> None:
    """A background task that does not end when cancelled (it waits on, say, a socket)."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


def test_a_stuck_task_and_a_stuck_close_do_not_stop_the_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, float, bool]:
        release = asyncio.Event()
        tasks = [asyncio.create_task(_stubborn(release), name="listen"),
                 asyncio.create_task(asyncio.sleep(3600), name="reap")]
        await asyncio.sleep(0)  # both running: a task cancelled before it starts just ends

        async def close() -> None:  # hangs, like a pool waiting on a lost connection
            await asyncio.Event().wait()

        started = time.monotonic()
        ended = await shut_down(tasks, close, 0.5)
        took = time.monotonic() - started
        reaped = tasks[1].cancelled()
        release.set()  # let the stubborn task go, so the loop can close
        await asyncio.wait(tasks, timeout=1)
        return ended, took, reaped

    with caplog.at_level(logging.WARNING, logger="grantkey.server"):
        ended, took, reaped = asyncio.run(scenario())
    assert ended is False
    assert took < 2.0, took
    assert reaped  # the well-behaved task was cancelled as usual
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "abandoned: listen, closing the services" in warning


def test_a_clean_shutdown_cancels_tasks_and_closes_once() -> None:
    async def scenario() -> tuple[bool, list[str], bool]:
        closed: list[str] = []
        tasks = [asyncio.create_task(asyncio.sleep(3600), name="watch")]

        async def close() -> None:
            closed.append("services")

        ended = await shut_down(tasks, close, 5)
        return ended, closed, tasks[0].cancelled()

    ended, closed, cancelled = asyncio.run(scenario())
    assert ended and closed == ["services"] and cancelled
