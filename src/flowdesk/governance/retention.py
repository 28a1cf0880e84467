"""Retention: delete the payloads of runs that finished long enough ago.

Inputs, outputs, step results and errors, signal payloads, and task contexts, forms and
drafts go; the runs' rows, statuses and timings stay, and so does the audit chain, which
never held payloads (only their SHA-256), so it still verifies. Each purge appends its own
audit record naming the runs it emptied.
"""

from __future__ import annotations

from datetime import timedelta

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import base


async def purge(app: App, older_than: timedelta, *, batch: int = 500) -> list[str]:
    """Purge every run that finished more than ``older_than`` ago; returns their ids."""
    if older_than <= timedelta(0):
        raise errors.ConfigurationError("Retention needs a positive age (older_than).")
    cutoff = base.now_ms() - int(older_than.total_seconds() * 1000)
    purged: list[str] = []
    while True:
        ids: list[str] = await app.submit(
            lambda tx: tx.purge_runs(cutoff, batch), actor="system:retention"
        )
        purged += ids
        if len(ids) < batch:
            return purged


def install(app: App, older_than: timedelta, *, every: timedelta = timedelta(hours=1)) -> None:
    """Have the app's workers purge old payloads about every ``every`` (a configured
    retention age: each worker checks, the purge itself is idempotent)."""
    if older_than <= timedelta(0):
        raise errors.ConfigurationError("Retention needs a positive age (older_than).")
    period_ms = int(every.total_seconds() * 1000)
    last = [0]

    async def hook() -> None:
        now = base.now_ms()
        if now - last[0] >= period_ms:
            last[0] = now
            await purge(app, older_than)

    app.upkeep_hooks.append(hook)
