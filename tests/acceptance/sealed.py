"""Open payloads read raw from a flowdesk database: they are sealed at rest, so a test
that checks stored outputs opens them with the installation's master key, as the store
does (`flowdesk.store.sql_payloads`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flowdesk.store import payloads, sql_payloads

IN_LIST = " IN (SELECT value FROM json_each(?))"
Rows = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def opener(
    database_url: str, rows: Rows, key_file: Path
) -> Callable[[str, int, str, str | None], Any]:
    """``open(run_id, seq, kind, stored)`` -> the payload's JSON value; kinds: ``input``,
    ``output``, ``error``, ``step.output``, ``step.error``, ``signal:<name>``. The master
    keys are those of ``key_file`` (the processes' ``FLOWDESK_MASTER_KEY_FILE``)."""
    masters = payloads.MasterKeys(tuple(payloads.read_key_file(key_file)), str(key_file))
    ring = payloads.Keyring(masters)
    pg = not database_url.startswith("sqlite")

    async def fetch(sql: str, params: Sequence[Any]) -> list[Any]:
        return rows(sql.replace(IN_LIST, " = ANY(?)") if pg else sql, tuple(params))

    def as_list(values: Sequence[str]) -> Any:
        return list(values) if pg else json.dumps(list(values))

    def open_(run_id: str, seq: int, kind: str, stored: str | None) -> Any:
        coro = sql_payloads.load(ring, fetch, as_list, [run_id])
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value.json(run_id, seq, kind, stored)
        raise AssertionError("loading keys suspended")

    return open_
