"""The app the trigger fault tests run in real ``flowdesk consume`` and ``flowdesk watch``
processes (its database comes from ``$FLOWDESK_DATABASE_URL``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

import flowdesk
from flowdesk.triggers import filedrop

app = flowdesk.App(poll_interval=0.1, lease_seconds=3)


class Order(BaseModel):
    order_id: str
    amount: int = Field(ge=0)


@app.step(name="book")
async def book(order_id: str, amount: int) -> str:
    return f"{order_id}:{amount}"


@app.workflow("take_order")
async def take_order(ctx: flowdesk.Context, order: Order) -> str:
    return str(await ctx.step(book, order.order_id, order.amount))


@app.step(name="count_lines")
def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


@app.workflow("ingest")
async def ingest(ctx: flowdesk.Context, file: filedrop.DroppedFile) -> int:
    return int(await ctx.step(count_lines, file.path))
