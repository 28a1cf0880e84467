"""A small order-fulfilment app: charge, wait for approval, ship in a child workflow.

Run it with a worker and a stream of sample orders (what ``make run`` does)::

    python examples/orders.py

or point the CLI at it from another terminal::

    flowdesk worker --app examples/orders.py:app
    flowdesk start orders.fulfil --app examples/orders.py:app --input '{"order_id": "A1"}'
    flowdesk runs list
"""

from __future__ import annotations

import asyncio
import random
import signal
from datetime import timedelta

import flowdesk

app = flowdesk.App()


@app.step(retries=3, backoff=2.0, retry_delay=0.2, timeout=30)
async def charge(order_id: str, amount: float) -> dict[str, object]:
    """Charge the customer (a payment API in real life; it fails now and then)."""
    if random.random() < 0.1:
        raise ConnectionError("payment gateway timed out")
    key = flowdesk.current_step().idempotency_key  # type: ignore[union-attr]
    return {"order_id": order_id, "amount": amount, "charge_id": f"ch_{key[-12:]}"}


@app.step
def reserve_stock(order_id: str, items: int) -> bool:
    """A blocking call (runs in the thread pool)."""
    return items <= 5


@app.step
async def book_courier(order_id: str) -> str:
    return f"TRK-{order_id}-{random.randint(1000, 9999)}"


@app.workflow("orders.ship")
async def ship(ctx: flowdesk.Context, order_id: str) -> str:
    return await ctx.step(book_courier, order_id)


@app.workflow("orders.fulfil")
async def fulfil(
    ctx: flowdesk.Context, order_id: str, amount: float = 10.0, items: int = 1
) -> dict[str, object]:
    if not await ctx.step(reserve_stock, order_id, items):
        return {"order_id": order_id, "status": "out of stock"}
    receipt = await ctx.step(charge, order_id, amount)
    if amount > 100:
        # Large orders wait for a person: `flowdesk signal RUN_ID approved --payload true`
        approved = await ctx.wait_signal("approved", timeout=timedelta(days=3))
        if not approved:
            return {"order_id": order_id, "status": "rejected"}
    await ctx.sleep(timedelta(seconds=1))  # a durable pause: survives restarts
    tracking = await ctx.child("orders.ship", {"order_id": order_id})
    return {"order_id": order_id, "status": "shipped", "receipt": receipt, "tracking": tracking}


async def demo() -> None:
    """A worker plus a feed of sample orders; big orders are approved a moment later."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with app, app.worker(concurrency=50):
        print(f"flowdesk demo on {app.database_url}: a worker and sample orders (Ctrl-C stops)")
        print("inspect it from another terminal: flowdesk runs list")
        n = 0
        watching: list[flowdesk.RunHandle] = []
        while not stop.is_set():
            n += 1
            amount = round(random.uniform(5, 150), 2)
            handle = await app.start(
                "orders.fulfil",
                {"order_id": f"O{n:05d}", "amount": amount, "items": n % 7},
                idempotency_key=f"demo-{app.database_url}-{n}-{random.random()}",
            )
            watching.append(handle)
            for h in list(watching):
                run = await app.get_run(h.id)
                if run.status == flowdesk.RunStatus.WAITING and "approved" in run.waiting_for:
                    await app.signal(h.id, "approved", True)
                    print(f"  {h.id} approved by the demo approver")
                elif run.status.finished:
                    watching.remove(h)
                    print(f"  {h.id} {run.status.value}: {run.output or run.error}")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


if __name__ == "__main__":
    asyncio.run(demo())
