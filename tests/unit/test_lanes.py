"""The lane gate: interactive first, slots never lost."""

from __future__ import annotations

import asyncio

from sign_in_tokens_client.contract.lanes import Lane, LaneGate


async def test_interactive_waiter_is_served_before_earlier_bulk_waiters() -> None:
    """When a slot frees, an interactive waiter gets it even if bulk waiters came first."""
    gate = LaneGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def take(lane: Lane, name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.turn(lane):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(take(Lane.BULK, "bulk-0", release))
    await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
    waiters = [asyncio.create_task(take(Lane.BULK, f"bulk-{i}")) for i in (1, 2)]
    await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
    waiters.append(asyncio.create_task(take(Lane.INTERACTIVE, "interactive")))
    await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == ["bulk-0", "interactive", "bulk-1", "bulk-2"]


async def test_cancelled_waiters_do_not_lose_or_leak_slots() -> None:
    """Cancelling waiters, including one already skipped by a release, leaves the gate whole."""
    gate = LaneGate(1)
    holder_done = asyncio.Event()

    async def hold() -> None:
        async with gate.turn(Lane.BULK):
            await holder_done.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
    waiters = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0)  # wait-ok: yield so the other tasks reach their await
    for task in waiters:
        task.cancel()
    holder_done.set()
    await asyncio.gather(holder, *waiters, return_exceptions=True)
    assert gate.waiting(Lane.BULK) == 0
    async with asyncio.timeout(1):
        async with gate.turn(Lane.INTERACTIVE):
            pass
    assert gate._free == 1
