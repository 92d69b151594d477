"""shared.aio: the services' loop runner and their task shutdown."""

from __future__ import annotations

import asyncio

from shared.aio import cancel_until_done


async def test_cancel_until_done_cancels_again_a_task_that_swallowed_the_cancel() -> None:
    """As redis-py 8.1 sometimes does: the first cancel is caught and the task goes on."""
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise

    async def failing() -> None:
        raise RuntimeError("gone")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await cancel_until_done(tasks)
    assert all(t.done() for t in tasks) and cancels == 2
    assert tasks[0].cancelled() and isinstance(tasks[1].exception(), RuntimeError)
