"""What the model gateway's accounting and rollouts keep in the store, once for every
dialect (same conventions as `sql.py`): usage and cost per provider call (the ledger),
budget spend and shared rate limits, route flags, shadow comparisons, drift samples and
drift alerts. ``flowdesk.models.ledger``, ``budgets``, ``rollout`` and ``drift`` use them.

Limits that must hold across every process sharing the database are single conditional
statements, so they are exact on both dialects:

* a budget reservation is one upsert ``... DO UPDATE SET spent = spent + ? WHERE spent +
  ? <= limit`` on the (scope, window) row (PostgreSQL locks the row and re-checks the
  condition on its newest version; SQLite serializes writers);
* a rate-limit slot upserts the key's row first (on PostgreSQL that locks it until commit,
  so checks of one key take turns), then counts the key's calls in the sliding window and
  logs this one only when there is room.

Ledger rows, budget spend, rate events and drift samples are accounting, not transitions:
they carry no audit record (the step that made the call carries one). Flag changes, drift
alert changes and drift resets do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowdesk import errors
from flowdesk.store import base, sql

Role = Literal["current", "canary", "shadow"]
DriftWindow = Literal["ref", "live"]
DriftLevel = Literal["none", "moderate", "major"]

# Columns the usage report may group by (validated before they reach SQL text).
USAGE_GROUPS: tuple[str, ...] = (
    "run_id",
    "seq",
    "workflow",
    "task",
    "model",
    "provider",
    "version",
    "role",
    "status",
)
_LEDGER_COLUMNS = (
    "at, run_id, seq, workflow, task, model, provider, version, role, status, error,"
    " tokens_in, tokens_out, cost_usd, latency_ms, confidence"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRow:
    """One provider call the gateway made."""

    at: int
    run_id: str | None
    seq: int | None
    workflow: str | None
    task: str
    model: str
    provider: str
    version: str
    role: Role
    status: Literal["ok", "error"]
    error: str | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    confidence: float | None

    def params(self) -> tuple[Any, ...]:
        return (
            self.at,
            self.run_id,
            self.seq,
            self.workflow,
            self.task,
            self.model,
            self.provider,
            self.version,
            self.role,
            self.status,
            self.error,
            self.tokens_in,
            self.tokens_out,
            self.cost_usd,
            self.latency_ms,
            self.confidence,
        )


def _ledger_from_row(r: Sequence[Any]) -> LedgerRow:
    return LedgerRow(
        at=int(r[0]),
        run_id=r[1],
        seq=None if r[2] is None else int(r[2]),
        workflow=r[3],
        task=r[4],
        model=r[5],
        provider=r[6],
        version=r[7],
        role=r[8],
        status=r[9],
        error=r[10],
        tokens_in=int(r[11]),
        tokens_out=int(r[12]),
        cost_usd=float(r[13]),
        latency_ms=float(r[14]),
        confidence=None if r[15] is None else float(r[15]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRow:
    """Usage summed over the ledger rows of one group (``key`` maps each grouping column
    to its value)."""

    key: dict[str, Any]
    calls: int
    errors: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms_avg: float
    latency_ms_max: float


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionStats:
    """Ledger figures of one (model, version, role) of a task: what rollouts compare."""

    model: str
    version: str
    role: Role
    calls: int
    errors: int
    latency_ms_avg: float
    latency_ms_max: float
    cost_usd: float
    cost_usd_avg: float
    confidence_avg: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowSample:
    at: int
    run_id: str | None
    seq: int | None
    task: str
    model: str
    version: str
    shadow_version: str
    agree: bool | None
    confidence: float | None
    shadow_confidence: float | None
    shadow_latency_ms: float | None
    shadow_error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowStats:
    """Agreement of a shadow version with the version that answered."""

    model: str
    version: str
    shadow_version: str
    samples: int
    compared: int  # samples where agreement is known (the shadow answered)
    agreed: int
    shadow_errors: int
    shadow_latency_ms_avg: float | None
    confidence_avg: float | None
    shadow_confidence_avg: float | None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None


@dataclass(frozen=True, slots=True, kw_only=True)
class FlagRecord:
    task: str
    route: str
    enabled: bool
    actor: str
    updated_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetUsage:
    scope: str
    window_start: int
    spent_nusd: int
    calls: int
    limit_nusd: int
    updated_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftSample:
    """What drift monitoring keeps of one answer: never the text."""

    length: int
    tokens: tuple[int, ...]  # hashed token buckets, distinct
    label: str | None
    confidence: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftState:
    task: str
    ref_count: int
    live_count: int
    level: DriftLevel
    since: int | None
    report: dict[str, Any] | None
    checked_at: int
    updated_at: int


_DRIFT_STATE_COLUMNS = "task, ref_count, live_count, level, since, report, checked_at, updated_at"


def _drift_state_from_row(r: Sequence[Any]) -> DriftState:
    return DriftState(
        task=r[0],
        ref_count=int(r[1]),
        live_count=int(r[2]),
        level=r[3],
        since=None if r[4] is None else int(r[4]),
        report=None if r[5] is None else json.loads(r[5]),
        checked_at=int(r[6]),
        updated_at=int(r[7]),
    )


def _num(value: Any) -> float:
    """PostgreSQL sums and averages of integers come back as Decimal."""
    return 0.0 if value is None else float(value)


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


class ModelsTx(sql.SqlTx):
    # -- the ledger ----------------------------------------------------------------------
    async def record_model_calls(self, rows: Sequence[LedgerRow]) -> None:
        text = (
            f"INSERT INTO model_ledger ({_LEDGER_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        )
        if len(rows) == 1:
            await self._run(text, rows[0].params())
        elif rows:
            await self._many(text, [r.params() for r in rows])

    # -- budgets -------------------------------------------------------------------------
    async def reserve_budget(
        self, scope: str, window_start: int, amount_nusd: int, limit_nusd: int
    ) -> bool:
        """Add ``amount_nusd`` to the scope's spend in this window if the sum stays within
        ``limit_nusd``; returns whether it did (all or nothing)."""
        if amount_nusd > limit_nusd:
            return False
        changed = await self._run(
            "INSERT INTO model_budget_usage (scope, window_start, spent_nusd, calls,"
            " limit_nusd, updated_at) VALUES (?,?,?,1,?,?) ON CONFLICT (scope, window_start)"
            " DO UPDATE SET spent_nusd = model_budget_usage.spent_nusd + excluded.spent_nusd,"
            " calls = model_budget_usage.calls + 1, limit_nusd = excluded.limit_nusd,"
            " updated_at = excluded.updated_at"
            " WHERE model_budget_usage.spent_nusd + excluded.spent_nusd <= ?",
            (scope, window_start, amount_nusd, limit_nusd, self.now, limit_nusd),
        )
        return changed == 1

    async def settle_budget(self, scope: str, window_start: int, delta_nusd: int) -> None:
        """Correct a reservation to the call's real cost (``delta`` may be negative: a
        failed call gives its whole reservation back)."""
        if delta_nusd:
            await self._run(
                "UPDATE model_budget_usage SET spent_nusd = spent_nusd + ?, updated_at = ?"
                " WHERE scope = ? AND window_start = ?",
                (delta_nusd, self.now, scope, window_start),
            )

    # -- shared rate limits ----------------------------------------------------------------
    async def take_rate_slot(self, key: str, limit: int, window_ms: int) -> int | None:
        """Log one call of ``key`` if fewer than ``limit`` were logged in the last
        ``window_ms``: returns None when it did, else the epoch ms when a slot frees."""
        now = self.now
        # The upsert locks the key's row (PostgreSQL) until commit: checks of a key take
        # turns, and the next statement's snapshot sees every call logged before.
        await self._run(
            "INSERT INTO model_rate_keys (key, updated_at) VALUES (?,?)"
            " ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at",
            (key, now),
        )
        taken = await self._run(
            "INSERT INTO model_rate_events (key, at) SELECT ?, ? WHERE"
            " (SELECT COUNT(*) FROM model_rate_events WHERE key = ? AND at > ?) < ?",
            (key, now, key, now - window_ms, limit),
        )
        if taken == 1:
            if now % 16 == 0:  # now and then: calls leave the log a minute after the window
                await self._run(
                    "DELETE FROM model_rate_events WHERE key = ? AND at <= ?",
                    (key, now - window_ms - 60_000),
                )
            return None
        row = await self._one(
            "SELECT MIN(at) FROM model_rate_events WHERE key = ? AND at > ?",
            (key, now - window_ms),
        )
        oldest = int(row[0]) if row and row[0] is not None else now
        return oldest + window_ms

    # -- flags ---------------------------------------------------------------------------
    async def set_model_flag(self, task: str, route: str, enabled: bool | None) -> None:
        """Switch a route of a task on or off at runtime (None: drop the override, so the
        config decides again). Audited."""
        subject = "model-task:" + task
        if enabled is None:
            await self._run("DELETE FROM model_flags WHERE task = ? AND route = ?", (task, route))
            self.audit("model.flag_cleared", subject, {"route": route})
            return
        await self._run(
            "INSERT INTO model_flags (task, route, enabled, actor, updated_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT (task, route) DO UPDATE SET"
            " enabled = excluded.enabled, actor = excluded.actor,"
            " updated_at = excluded.updated_at",
            (task, route, int(enabled), self.actor, self.now),
        )
        self.audit("model.flag_set", subject, {"route": route, "enabled": enabled})

    # -- shadow comparisons ----------------------------------------------------------------
    async def record_shadow_samples(self, rows: Sequence[ShadowSample]) -> None:
        if rows:
            await self._many(
                "INSERT INTO model_shadow_samples (at, run_id, seq, task, model, version,"
                " shadow_version, agree, confidence, shadow_confidence, shadow_latency_ms,"
                " shadow_error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.at,
                        r.run_id,
                        r.seq,
                        r.task,
                        r.model,
                        r.version,
                        r.shadow_version,
                        None if r.agree is None else int(r.agree),
                        r.confidence,
                        r.shadow_confidence,
                        r.shadow_latency_ms,
                        r.shadow_error,
                    )
                    for r in rows
                ],
            )

    # -- drift ---------------------------------------------------------------------------
    async def add_drift_sample(
        self, task: str, sample: DriftSample, ref_size: int, live_size: int
    ) -> tuple[DriftWindow, int]:
        """Keep a sample: in the reference window until it holds ``ref_size``, then in the
        ring buffer of the latest ``live_size`` (the oldest is overwritten). Returns where
        it went. The state row's upsert takes the next position atomically."""
        row = await self._one(
            "INSERT INTO model_drift_state (task, ref_count, live_count, level, checked_at,"
            " updated_at) VALUES (?, 1, 0, 'none', 0, ?) ON CONFLICT (task) DO UPDATE SET"
            " ref_count = CASE WHEN model_drift_state.ref_count < ?"
            "  THEN model_drift_state.ref_count + 1 ELSE model_drift_state.ref_count END,"
            " live_count = CASE WHEN model_drift_state.ref_count < ?"
            "  THEN model_drift_state.live_count ELSE model_drift_state.live_count + 1 END,"
            " updated_at = excluded.updated_at RETURNING ref_count, live_count",
            (task, self.now, ref_size, ref_size),
        )
        assert row is not None
        ref_count, live_count = int(row[0]), int(row[1])
        win: DriftWindow
        if live_count == 0:
            win, slot = "ref", ref_count - 1
        else:
            win, slot = "live", (live_count - 1) % live_size
        await self._run(
            "INSERT INTO model_drift_samples (task, win, slot, at, length, tokens, label,"
            " confidence) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (task, win, slot) DO UPDATE"
            " SET at = excluded.at, length = excluded.length, tokens = excluded.tokens,"
            " label = excluded.label, confidence = excluded.confidence",
            (
                task,
                win,
                slot,
                self.now,
                sample.length,
                json.dumps(list(sample.tokens), separators=(",", ":")),
                sample.label,
                sample.confidence,
            ),
        )
        return win, slot

    async def claim_drift_check(self, task: str, interval_ms: int) -> bool:
        """Whether this process should check the task now (at most one check per
        ``interval_ms`` across every process)."""
        changed = await self._run(
            "UPDATE model_drift_state SET checked_at = ? WHERE task = ? AND checked_at <= ?",
            (self.now, task, self.now - interval_ms),
        )
        return changed == 1

    async def set_drift_report(self, task: str, level: DriftLevel, report: dict[str, Any]) -> bool:
        """Store the latest drift report; returns whether the alert level changed (then
        the change is audited and ``since`` restarts)."""
        row = await self._one("SELECT level FROM model_drift_state WHERE task = ?{update}", (task,))
        if row is None:
            raise errors.NotFound(f"No drift samples for model task {task!r} yet.")
        changed = bool(row[0] != level)
        encoded = json.dumps(report, separators=(",", ":"))
        if changed:
            await self._run(
                "UPDATE model_drift_state SET level = ?, report = ?, checked_at = ?, since = ?"
                " WHERE task = ?",
                (level, encoded, self.now, None if level == "none" else self.now, task),
            )
        else:
            await self._run(
                "UPDATE model_drift_state SET report = ?, checked_at = ? WHERE task = ?",
                (encoded, self.now, task),
            )
        if changed:
            self.audit(
                "model.drift_alert",
                "model-task:" + task,
                {"level": level, "was": row[0], "drifted": report.get("drifted", [])},
            )
        return changed

    async def reset_drift(self, task: str, *, rebase: bool) -> int:
        """Start the task's drift monitoring again: ``rebase`` makes the live window the
        new reference (after an accepted change); otherwise every sample is dropped and
        the next answers fill the reference. Returns the reference size now. Audited."""
        row = await self._one(
            "SELECT live_count FROM model_drift_state WHERE task = ?{update}", (task,)
        )
        if row is None:
            raise errors.NotFound(f"No drift samples for model task {task!r} yet.")
        await self._run(
            "DELETE FROM model_drift_samples WHERE task = ? AND win = ?",
            (task, "ref" if rebase else "live"),
        )
        if rebase:
            await self._run(
                "UPDATE model_drift_samples SET win = 'ref' WHERE task = ? AND win = 'live'",
                (task,),
            )
            counted = await self._one(
                "SELECT COUNT(*) FROM model_drift_samples WHERE task = ?", (task,)
            )
            ref_count = int(counted[0]) if counted else 0
        else:
            await self._run("DELETE FROM model_drift_samples WHERE task = ?", (task,))
            ref_count = 0
        await self._run(
            "UPDATE model_drift_state SET ref_count = ?, live_count = 0, level = 'none',"
            " since = NULL, report = NULL, updated_at = ? WHERE task = ?",
            (ref_count, self.now, task),
        )
        self.audit(
            "model.drift_rebased" if rebase else "model.drift_reset",
            "model-task:" + task,
            {"reference": ref_count},
        )
        return ref_count


class ModelsStore(sql.SqlStore):
    """Reads of the ledger, budgets, flags, rollout figures and drift state."""

    async def model_calls(
        self, *, run_id: str | None = None, task: str | None = None, limit: int = 1000
    ) -> list[LedgerRow]:
        """Ledger rows, oldest first, of one run (or one task, or all)."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        if task is not None:
            where.append("task = ?")
            params.append(task)
        rows = await self._read(
            f"SELECT {_LEDGER_COLUMNS} FROM model_ledger WHERE {' AND '.join(where)}"
            " ORDER BY id LIMIT ?",
            (*params, max(1, limit)),
        )
        return [_ledger_from_row(r) for r in rows]

    async def model_usage(
        self,
        *,
        by: Sequence[str] = ("task", "model"),
        run_id: str | None = None,
        workflow: str | None = None,
        task: str | None = None,
        since: int | None = None,
    ) -> list[UsageRow]:
        """Calls, errors, tokens, cost and latency summed per group ``by`` (columns of
        `USAGE_GROUPS`), filtered by run, workflow, task and time (epoch ms)."""
        unknown = [c for c in by if c not in USAGE_GROUPS]
        if unknown:
            raise errors.ConfigurationError(
                f"Cannot group model usage by {unknown}: use {', '.join(USAGE_GROUPS)}."
            )
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column, value in (("run_id", run_id), ("workflow", workflow), ("task", task)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        groups = ", ".join(by)
        select = (groups + ", ") if by else ""
        text = (
            f"SELECT {select}COUNT(*), SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END),"
            " SUM(tokens_in), SUM(tokens_out), SUM(cost_usd), AVG(latency_ms), MAX(latency_ms)"
            f" FROM model_ledger WHERE {' AND '.join(where)}"
        )
        if by:
            text += f" GROUP BY {groups} ORDER BY {groups}"
        rows = await self._read(text, params)
        n = len(by)
        return [
            UsageRow(
                key=dict(zip(by, r[:n], strict=True)),
                calls=int(r[n]),
                errors=int(_num(r[n + 1])),
                tokens_in=int(_num(r[n + 2])),
                tokens_out=int(_num(r[n + 3])),
                cost_usd=_num(r[n + 4]),
                latency_ms_avg=_num(r[n + 5]),
                latency_ms_max=_num(r[n + 6]),
            )
            for r in rows
            if int(r[n])
        ]

    async def version_stats(self, task: str, *, since: int | None = None) -> list[VersionStats]:
        rows = await self._read(
            "SELECT model, version, role, COUNT(*),"
            " SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), AVG(latency_ms),"
            " MAX(latency_ms), SUM(cost_usd), AVG(cost_usd), AVG(confidence)"
            " FROM model_ledger WHERE task = ? AND at >= ?"
            " GROUP BY model, version, role ORDER BY model, role, version",
            (task, since or 0),
        )
        return [
            VersionStats(
                model=r[0],
                version=r[1],
                role=r[2],
                calls=int(r[3]),
                errors=int(_num(r[4])),
                latency_ms_avg=_num(r[5]),
                latency_ms_max=_num(r[6]),
                cost_usd=_num(r[7]),
                cost_usd_avg=_num(r[8]),
                confidence_avg=_opt(r[9]),
            )
            for r in rows
        ]

    async def shadow_stats(self, task: str, *, since: int | None = None) -> list[ShadowStats]:
        rows = await self._read(
            "SELECT model, version, shadow_version, COUNT(*), COUNT(agree),"
            " SUM(CASE WHEN agree = 1 THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN shadow_error IS NOT NULL THEN 1 ELSE 0 END),"
            " AVG(shadow_latency_ms), AVG(confidence), AVG(shadow_confidence)"
            " FROM model_shadow_samples WHERE task = ? AND at >= ?"
            " GROUP BY model, version, shadow_version ORDER BY model, version, shadow_version",
            (task, since or 0),
        )
        return [
            ShadowStats(
                model=r[0],
                version=r[1],
                shadow_version=r[2],
                samples=int(r[3]),
                compared=int(r[4]),
                agreed=int(_num(r[5])),
                shadow_errors=int(_num(r[6])),
                shadow_latency_ms_avg=_opt(r[7]),
                confidence_avg=_opt(r[8]),
                shadow_confidence_avg=_opt(r[9]),
            )
            for r in rows
        ]

    async def model_flags(self) -> list[FlagRecord]:
        rows = await self._read(
            "SELECT task, route, enabled, actor, updated_at FROM model_flags ORDER BY task, route"
        )
        return [
            FlagRecord(task=r[0], route=r[1], enabled=bool(r[2]), actor=r[3], updated_at=int(r[4]))
            for r in rows
        ]

    async def budget_usage(self, scopes: Iterable[tuple[str, int]] = ()) -> list[BudgetUsage]:
        """Spend rows: of the given (scope, window start) pairs, or all."""
        wanted = list(scopes)
        rows = await self._read(
            "SELECT scope, window_start, spent_nusd, calls, limit_nusd, updated_at"
            " FROM model_budget_usage ORDER BY scope, window_start"
        )
        found = [
            BudgetUsage(
                scope=r[0],
                window_start=int(r[1]),
                spent_nusd=int(r[2]),
                calls=int(r[3]),
                limit_nusd=int(r[4]),
                updated_at=int(r[5]),
            )
            for r in rows
        ]
        if wanted:
            keep = set(wanted)
            found = [b for b in found if (b.scope, b.window_start) in keep]
        return found

    async def drift_state(self, task: str) -> DriftState | None:
        rows = await self._read(
            f"SELECT {_DRIFT_STATE_COLUMNS} FROM model_drift_state WHERE task = ?", (task,)
        )
        return _drift_state_from_row(rows[0]) if rows else None

    async def drift_states(self) -> list[DriftState]:
        rows = await self._read(
            f"SELECT {_DRIFT_STATE_COLUMNS} FROM model_drift_state ORDER BY task"
        )
        return [_drift_state_from_row(r) for r in rows]

    async def drift_samples(self, task: str) -> list[tuple[DriftWindow, int, DriftSample]]:
        """Every kept sample of the task: (window, slot, sample)."""
        rows = await self._read(
            "SELECT win, slot, length, tokens, label, confidence FROM model_drift_samples"
            " WHERE task = ? ORDER BY win, slot",
            (task,),
        )
        return [
            (
                r[0],
                int(r[1]),
                DriftSample(
                    length=int(r[2]),
                    tokens=tuple(json.loads(r[3])),
                    label=r[4],
                    confidence=_opt(r[5]),
                ),
            )
            for r in rows
        ]


def models_store(store: base.Store) -> ModelsStore:
    """``store`` as the model accounting store, or a `ConfigurationError`."""
    if not isinstance(store, ModelsStore):
        raise errors.ConfigurationError(
            f"The store {type(store).__name__} keeps no model usage: flowdesk.models' ledger, "
            "budgets, rollouts and drift need a SQL store (SQLite or PostgreSQL)."
        )
    return store


def models_tx(tx: base.Tx) -> ModelsTx:
    if not isinstance(tx, ModelsTx):
        raise errors.ConfigurationError(
            f"The store's transaction {type(tx).__name__} keeps no model usage."
        )
    return tx
