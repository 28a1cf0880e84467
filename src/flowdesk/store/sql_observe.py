"""What observability reads and writes: the counts behind the store gauges of
``flowdesk.observe.metrics`` and the trace context of a run, once for every dialect (same
conventions as `sql.py`). The counts are single grouped statements over the active rows
only (indexes ``runs_status`` and ``tasks_status``), cheap enough to run at every scrape.
"""

from __future__ import annotations

from flowdesk.store import base, sql
from flowdesk.store.base import RunGauge, RunStatus, TaskGauge


class ObserveTx(sql.SqlTx):
    async def set_trace_context(self, run_id: str, traceparent: str) -> bool:
        changed = await self._run(
            "UPDATE runs SET trace_context = ? WHERE id = ? AND trace_context IS NULL",
            (traceparent, run_id),
        )
        return changed == 1


class ObserveStore(sql.SqlStore):
    async def run_gauges(self) -> list[RunGauge]:
        rows = await self._read(
            "SELECT queue, workflow, status, COUNT(*),"
            " SUM(CASE WHEN due_at <= ? THEN 1 ELSE 0 END),"
            " MIN(CASE WHEN due_at <= ? THEN due_at END)"
            " FROM runs WHERE status IN ('queued', 'running', 'waiting')"
            " GROUP BY queue, workflow, status",
            (base.now_ms(), base.now_ms()),
        )
        return [
            RunGauge(
                queue=str(r[0]),
                workflow=str(r[1]),
                status=RunStatus(r[2]),
                count=int(r[3]),
                due=int(r[4] or 0),
                oldest_due_at=None if r[5] is None else int(r[5]),
            )
            for r in rows
        ]

    async def task_gauges(self) -> list[TaskGauge]:
        rows = await self._read(
            "SELECT kind, status, COUNT(*),"
            " SUM(CASE WHEN due_at IS NOT NULL AND due_at < ? THEN 1 ELSE 0 END)"
            " FROM tasks WHERE status IN ('open', 'claimed') GROUP BY kind, status",
            (base.now_ms(),),
        )
        return [TaskGauge(str(r[0]), str(r[1]), int(r[2]), int(r[3] or 0)) for r in rows]
