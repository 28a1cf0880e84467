"""Retention: delete the payloads of runs that finished long enough ago.

Two ways. `set_policy` + `install_policies` (per workflow, by key destruction): a durable
scheduled job destroys the data keys of finished runs past their workflow's period, so
their sealed payloads can never be read again. `purge`/`install` (one age for every run)
empties the payload columns themselves, as described below.

Inputs, outputs, step results and errors, signal payloads, and task contexts, forms and
drafts go; the runs' rows, statuses and timings stay, and so does the audit chain, which
never held payloads (only their SHA-256), so it still verifies. Each purge appends its own
audit record naming the runs it emptied.
"""

from __future__ import annotations

from datetime import timedelta

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.engine.context import Context
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


# -- retention by policy: key destruction -----------------------------------------------------
EXPIRE_WORKFLOW = "flowdesk.retention.expire"


async def set_policy(app: App, workflow: str, keep: timedelta | None) -> None:
    """Keep the payloads of ``workflow``'s finished runs for ``keep`` (None: forever). After
    that, the expiry job destroys their data keys: rows, statuses and the audit stay."""
    if keep is not None and keep <= timedelta(0):
        raise errors.ConfigurationError("A retention period must be positive (keep).")
    keep_ms = None if keep is None else int(keep.total_seconds() * 1000)
    await app.submit(lambda tx: tx.set_retention(workflow, keep_ms), actor="system:retention")


async def expire(app: App, *, batch: int = 500) -> list[str]:
    """Destroy the data keys of every finished run past its workflow's retention period;
    returns their ids. Idempotent: a run whose key is gone is not counted again."""
    expired: list[str] = []
    while True:
        ids: list[str] = await app.submit(
            lambda tx: tx.expire_payloads(batch), actor="system:retention"
        )
        expired += ids
        if len(ids) < batch:
            return expired


def install_policies(app: App, *, cron: str = "*/15 * * * *") -> None:
    """Register the durable expiry job: a scheduled workflow (one run per tick, however
    many workers run; a tick missed while nothing ran is caught up once) whose step
    destroys the keys of runs past their retention (`set_policy`). Each destruction is an
    audit record ``retention.keys_destroyed`` naming the runs."""
    if EXPIRE_WORKFLOW in app.registry.workflows:
        return

    @app.step(name="retention.expire_keys")
    async def expire_keys() -> list[str]:
        return await expire(app)

    @app.workflow(EXPIRE_WORKFLOW, schedule=cron, catchup="skip")
    async def expire_job(ctx: Context) -> int:
        return len(await ctx.step(expire_keys))
