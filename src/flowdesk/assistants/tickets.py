"""Tickets: where the support assistant files what it cannot answer.

`TicketDesk` writes each ticket to a SQL ``tickets`` table through a `SqlConnector`
upsert keyed by the step's idempotency key (a retried or replayed step writes one row,
never two) and, when given a `RestConnector`, also posts it to a ticketing service's
``POST /tickets`` (with the same key in its ``Idempotency-Key`` header). Call `TicketDesk.create`
inside a step.
"""

from __future__ import annotations

from typing import Any

import pydantic

from flowdesk.connectors import rest, sql

__all__ = ["TICKETS_DDL", "TicketDesk", "TicketRow", "TicketReceipt"]

TICKETS_DDL = (
    "CREATE TABLE IF NOT EXISTS tickets ("
    " idempotency_key VARCHAR(200) PRIMARY KEY,"
    " thread_id VARCHAR(200) NOT NULL,"
    " customer VARCHAR(200) NOT NULL,"
    " intent VARCHAR(100) NOT NULL,"
    " priority VARCHAR(10) NOT NULL,"
    " sentiment VARCHAR(10) NOT NULL,"
    " text TEXT NOT NULL)"
)
"""A ``tickets`` table the upsert fits (PostgreSQL, SQLite, MariaDB)."""


class TicketRow(pydantic.BaseModel):
    thread_id: str
    customer: str
    intent: str
    priority: str
    sentiment: str
    text: str
    """The customer's message with personal data redacted."""


class TicketReceipt(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    id: str


UPSERT = sql.upsert("create_ticket", "tickets", TicketRow)
POST = rest.operation("create_ticket", "POST", "/tickets", TicketRow, TicketReceipt)


class TicketDesk:
    def __init__(
        self, database: sql.SqlConnector | None = None, service: rest.RestConnector | None = None
    ) -> None:
        self.database = database
        self.service = service

    async def create(self, row: TicketRow, key: str) -> dict[str, Any]:
        """File ``row`` under ``key`` (the calling step's idempotency key) everywhere
        configured; returns what each target said."""
        out: dict[str, Any] = {"idempotency_key": key}
        if self.database is not None:
            written = await self.database.call(UPSERT, row, idempotency_key=key)
            out["table"] = {"table": written.table, "inserted": written.inserted}
        if self.service is not None:
            receipt = await self.service.call(POST, row, idempotency_key=key)
            out["service"] = {"id": receipt.id}
        return out
