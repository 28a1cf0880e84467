"""Data subjects, erasure by key destruction, retention by policy and master key rotation:
their SQL, once for every dialect (same conventions as `sql.py`).

Destroying a data key sets its ``wrapped`` column to NULL in the same transaction as the
audit record that says so. Rows, statuses, step names, timings and costs stay; payloads
sealed under the key read as ``{"$erased": reason}`` from then on. The audit chain holds
digests of ciphertexts, never of plaintext, so it keeps verifying and reveals nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flowdesk import errors
from flowdesk.store import base, payloads, sql

_PAYLOAD_COLUMNS = (
    ("runs", "input", "id"),
    ("runs", "output", "id"),
    ("runs", "error", "id"),
    ("steps", "output", "run_id"),
    ("steps", "error", "run_id"),
    ("signals", "payload", "run_id"),
    ("tasks", "context", "run_id"),
    ("tasks", "draft", "run_id"),
    ("tasks", "result", "run_id"),
)
_SUBJECT = re.compile(r"^[^\s\x00-\x1f]{1,200}$")


def check_subject(subject: str) -> str:
    if not isinstance(subject, str) or not _SUBJECT.match(subject):
        raise errors.ConfigurationError(
            f"Data subject {subject!r}: use 1-200 visible characters without spaces, "
            "such as 'customer:42' (a pseudonymous id, not a name or an e-mail address)."
        )
    return subject


class PrivacyTx(sql.SqlTx):
    async def add_subject(self, run_id: str, owner: str | None, subject: str) -> bool:
        """Tie a run's payloads to a data subject: its data key is wrapped again by the
        keys of all its subjects (payload ciphertexts stay as they are). Fenced when
        ``owner`` is given. Returns False when the run already had that subject."""
        check_subject(subject)
        if owner is not None:
            await self._fence(run_id, owner)
        elif await self._one("SELECT 1 FROM runs WHERE id = ?", (run_id,)) is None:
            raise errors.RunNotFound(run_id)
        added = await self._run(
            "INSERT INTO run_subjects (run_id, subject) VALUES (?,?) ON CONFLICT DO NOTHING",
            (run_id, subject),
        )
        if not added:
            return False
        if self.keys is not None:
            key = await self._key(run_id)
            assert key is not None
            subjects = [
                r[0]
                for r in await self._all(
                    "SELECT subject FROM run_subjects WHERE run_id = ? ORDER BY subject",
                    (run_id,),
                )
            ]
            subject_keys = [await self._subject_key(s) for s in subjects]
            by, wrapped = self.keys.wrap(key, "run", run_id, subject_keys)
            await self._run(
                "UPDATE data_keys SET wrapped_by = ?, wrapped = ? WHERE id = ?",
                (by, wrapped, key.id),
            )
        self.audit("run.subject_added", "run:" + run_id, {"subject": subject})
        return True

    async def erase_subject(self, subject: str, reason: str = "") -> dict[str, Any]:
        """Erase a data subject: cancel its unfinished runs (never resumed on payloads it
        can no longer read), then destroy its key and its runs' keys, with one audit
        record. Runs already finished keep their rows; their payloads read as erased."""
        check_subject(subject)
        why = f"data subject {subject} was erased" + (f" ({reason})" if reason else "")
        run_ids = [
            r[0]
            for r in await self._all(
                "SELECT run_id FROM run_subjects WHERE subject = ? ORDER BY run_id", (subject,)
            )
        ]
        cancelled: list[str] = []
        if run_ids:
            await self._clear_plain(run_ids, why)
            for (run_id,) in await self._all(
                "SELECT id FROM runs WHERE id" + sql.IN_LIST + " AND status IN "
                "('queued', 'running', 'waiting') ORDER BY id{update}",
                (self._list(run_ids),),
            ):
                cancelled.append(run_id)
                await self._cancel_erased(run_id, why)
        keys = await self._destroy(
            "kind = 'subject' AND owner = ?", (subject,), why
        ) + await self._destroy_runs(run_ids, why)
        self.audit(
            "subject.erased",
            "subject:" + subject,
            {"reason": reason, "runs": run_ids, "cancelled": cancelled, "keys": keys},
        )
        return {"subject": subject, "runs": run_ids, "cancelled": cancelled, "keys": keys}

    async def _clear_plain(self, run_ids: Sequence[str], why: str) -> None:
        """Payloads stored unsealed (written before encryption was on, or with it off) have
        no key to destroy: they are overwritten with the erased marker instead."""
        marker, ids = payloads.erased_text(why), self._list(run_ids)
        for table, column, run_column in _PAYLOAD_COLUMNS:
            await self._run(
                f"UPDATE {table} SET {column} = ? WHERE {run_column}" + sql.IN_LIST + f" AND"
                f" {column} IS NOT NULL AND substr({column}, 1, 5) <> '{payloads.PREFIX}'",
                (marker, ids),
            )

    async def _destroy_runs(self, run_ids: Sequence[str], why: str) -> list[str]:
        if not run_ids:
            return []
        if self.keys is not None:
            self.keys.forget(run_ids)
        return await self._destroy(
            "kind = 'run' AND owner" + sql.IN_LIST, (self._list(run_ids),), why
        )

    async def _destroy(self, where: str, params: Sequence[Any], why: str) -> list[str]:
        rows = await self._all(
            "UPDATE data_keys SET wrapped = NULL, destroyed_at = ?, destroyed_reason = ?"
            f" WHERE {where} AND wrapped IS NOT NULL RETURNING id",
            (self.now, why, *params),
        )
        return sorted(r[0] for r in rows)

    async def set_retention(self, workflow: str, keep_ms: int | None) -> None:
        """Keep the payloads of ``workflow``'s finished runs ``keep_ms`` (None: forever)."""
        if keep_ms is None:
            await self._run("DELETE FROM retention_policies WHERE workflow = ?", (workflow,))
        else:
            if keep_ms <= 0:
                raise errors.ConfigurationError(
                    f"Retention of {workflow!r} must be a positive time, not {keep_ms} ms."
                )
            await self._run(
                "INSERT INTO retention_policies (workflow, keep_ms, updated_at) VALUES (?,?,?)"
                " ON CONFLICT (workflow) DO UPDATE SET keep_ms = excluded.keep_ms,"
                " updated_at = excluded.updated_at",
                (workflow, keep_ms, self.now),
            )
        self.audit("retention.policy", "workflow:" + workflow, {"keep_ms": keep_ms})

    async def expire_payloads(self, limit: int) -> list[str]:
        """Destroy the data keys of finished runs older than their workflow's retention
        policy (up to ``limit`` runs); one audit record names them. Returns their ids."""
        rows = await self._all(
            "SELECT r.id FROM runs r JOIN retention_policies p ON p.workflow = r.workflow"
            " JOIN data_keys k ON k.kind = 'run' AND k.owner = r.id AND k.wrapped IS NOT NULL"
            " WHERE r.finished_at IS NOT NULL AND r.finished_at < ? - p.keep_ms"
            " ORDER BY r.finished_at LIMIT ?",
            (self.now, limit),
        )
        run_ids = [r[0] for r in rows]
        if not run_ids:
            return []
        await self._clear_plain(run_ids, "retention period over")
        keys = await self._destroy_runs(run_ids, "retention period over")
        self.audit(
            "retention.keys_destroyed",
            "runs",
            {"runs": run_ids, "keys": keys},
            actor="system:retention",
        )
        return run_ids

    async def rewrap_keys(self, limit: int) -> int:
        """Wrap up to ``limit`` data keys still wrapped by an older master key with the
        current one (the payloads sealed under them do not change). Returns how many."""
        if self.keys is None:
            raise errors.ConfigurationError(
                "Payload encryption is off ($FLOWDESK_PAYLOAD_ENCRYPTION): no keys to rotate."
            )
        ring = self.keys
        current = ring.masters.current_id
        rows = await self._all(
            "SELECT id, kind, owner, wrapped_by, wrapped FROM data_keys WHERE wrapped IS NOT"
            " NULL AND wrapped_by <> ? AND substr(wrapped_by, 1, 9) <> 'subjects:' ORDER BY id"
            " LIMIT ?{update}",
            (current, limit),
        )
        changed: dict[str, int] = {}
        for key_id, kind, owner, by, wrapped in rows:
            key = ring.unwrap(key_id, kind, owner, by, wrapped)
            new_by, new_wrapped = ring.wrap(key, kind, owner)
            await self._run(
                "UPDATE data_keys SET wrapped_by = ?, wrapped = ?, rotated_at = ? WHERE id = ?",
                (new_by, new_wrapped, self.now, key_id),
            )
            changed[by] = changed.get(by, 0) + 1
        if rows:
            self.audit("keys.rewrapped", "keys", {"to": current, "from": changed})
        return len(rows)


class PrivacyStore(sql.SqlStore):
    async def run_subjects(self, run_id: str) -> list[str]:
        rows = await self._read(
            "SELECT subject FROM run_subjects WHERE run_id = ? ORDER BY subject", (run_id,)
        )
        return [r[0] for r in rows]

    async def subject_runs(self, subject: str) -> list[str]:
        rows = await self._read(
            "SELECT s.run_id FROM run_subjects s JOIN runs r ON r.id = s.run_id"
            " WHERE s.subject = ? ORDER BY r.created_at, r.id",
            (subject,),
        )
        return [r[0] for r in rows]

    async def key_usage(self) -> dict[str, int]:
        """Live data keys counted by what wraps them (a master key id, or subjects)."""
        rows = await self._read(
            "SELECT CASE WHEN substr(wrapped_by, 1, 9) = 'subjects:' THEN 'subjects'"
            " ELSE wrapped_by END,"
            " COUNT(*) FROM data_keys WHERE wrapped IS NOT NULL GROUP BY 1 ORDER BY 1"
        )
        return {r[0]: int(r[1]) for r in rows}

    async def retention_policies(self) -> dict[str, int]:
        rows = await self._read("SELECT workflow, keep_ms FROM retention_policies ORDER BY 1")
        return {r[0]: int(r[1]) for r in rows}

    async def signals_of(self, run_id: str) -> list[dict[str, Any]]:
        """A run's signals with their payloads opened (for a subject-access export)."""
        rows = await self._read(
            "SELECT id, name, payload, sent_at, consumed_seq FROM signals WHERE run_id = ?"
            " ORDER BY id",
            (run_id,),
        )
        keys = await self.run_keys([run_id])
        return [
            {
                "name": r[1],
                "payload": keys.json(run_id, 0, "signal:" + r[1], r[2]),
                "sent_at": base.ms_to_dt(r[3]),
                "consumed_seq": r[4],
            }
            for r in rows
        ]


def erased_reason(value: Any) -> str | None:
    """The reason an opened payload was erased, or None when it was not."""
    if payloads.is_erased(value):
        return str(value[payloads.ERASED])
    return None
