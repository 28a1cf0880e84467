"""Users, API tokens, human tasks, audit reads and retention: their SQL, once for every
dialect (same conventions as `sql.py`). Each change appends its audit record in its own
transaction, and a completed task wakes its run in that same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from flowdesk import errors
from flowdesk.store import audit, base, people, sql
from flowdesk.store.people import Person, TaskStatus

_ACTIVE_TASK = "('open', 'claimed')"


def _candidate(task: Sequence[Any], who: Person) -> bool:
    """May ``who`` act on the task row (candidates JSON at [0], assignee at [1])?"""
    cands = json.loads(task[0])
    return people.may_act(
        who, task[1], cands.get("users", []), cands.get("groups", []), cands.get("roles", [])
    )


class PeopleTx(sql.SqlTx):
    # -- tasks ---------------------------------------------------------------------------
    async def _task_row(self, task_id: str) -> Sequence[Any]:
        row = await self._one(
            "SELECT candidates, assignee, status, initiator, four_eyes, run_id, form_schema,"
            " escalation, escalation_level, due_at, created_at, escalate_at"
            " FROM tasks WHERE id = ?{update}",
            (task_id,),
        )
        if row is None:
            raise errors.TaskNotFound(task_id)
        return row

    def _task_event(self, task_id: str, kind: str, data: Any, actor: str | None = None) -> Any:
        return self._run(
            "INSERT INTO task_events (task_id, at, actor, kind, data) VALUES (?,?,?,?,?)",
            (task_id, self.now, actor or self.actor, kind, json.dumps(data)),
        )

    async def create_task(self, task: people.NewTask) -> bool:
        if await self._one("SELECT 1 FROM tasks WHERE id = ?", (task.id,)):
            return False  # replay after a crash: the task already exists
        row = await self._one("SELECT initiator FROM runs WHERE id = ?", (task.run_id,))
        initiator = None if row is None else row[0]
        assignee: str | None = None
        if task.assign == "workload":
            assignee = await self._least_loaded(task, initiator)
        escalate_at = self._escalate_at(task.escalation, 0, task.due_at, self.now)
        candidates = {
            "users": list(task.users),
            "groups": list(task.groups),
            "roles": list(task.roles),
        }
        context = await self._seal(task.run_id, task.seq, "task.context", task.context)
        await self._run(
            "INSERT INTO tasks (id, run_id, seq, kind, title, status, priority, labels,"
            " form_schema, form_ref, context, candidates, assignee, initiator, four_eyes,"
            " due_at, follow_up_at, escalation, escalation_level, escalate_at, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?)",
            (
                task.id,
                task.run_id,
                task.seq,
                task.kind,
                task.title,
                "claimed" if assignee else "open",
                task.priority,
                json.dumps(list(task.labels)),
                task.form_schema,
                task.form_ref,
                context,
                json.dumps(candidates),
                assignee,
                initiator,
                int(task.four_eyes),
                task.due_at,
                task.follow_up_at,
                json.dumps(list(task.escalation)) if task.escalation else None,
                escalate_at,
                self.now,
                self.now,
            ),
        )
        await self._set_candidates(task.id, candidates)
        self.audit(
            "task.created",
            "task:" + task.id,
            {
                "run_id": task.run_id,
                "seq": task.seq,
                "kind": task.kind,
                "candidates": candidates,
                "assignee": assignee,
                "four_eyes": task.four_eyes,
                "due_at": task.due_at,
                "context_sha256": audit.digest(context),
            },
        )
        return True

    async def _set_candidates(self, task_id: str, cands: dict[str, list[str]]) -> None:
        await self._run("DELETE FROM task_candidates WHERE task_id = ?", (task_id,))
        rows = [
            (task_id, kind, name)
            for kind, key in (("user", "users"), ("group", "groups"), ("role", "roles"))
            for name in dict.fromkeys(cands.get(key, []))
        ]
        if rows:
            await self._many(
                "INSERT INTO task_candidates (task_id, kind, name) VALUES (?,?,?)", rows
            )

    async def _least_loaded(self, task: people.NewTask, initiator: str | None) -> str | None:
        """The candidate user with the fewest open tasks (ties: by id)."""
        names = set(task.users)
        if task.groups or task.roles:
            for uid, roles, groups in await self._all(
                "SELECT id, roles, user_groups FROM users WHERE disabled = 0"
            ):
                if set(json.loads(groups)) & set(task.groups) or set(json.loads(roles)) & set(
                    task.roles
                ):
                    names.add(uid)
        if task.four_eyes and initiator:
            names.discard(initiator)
        if not names:
            return None
        load = {n: 0 for n in names}
        for assignee, count in await self._all(
            f"SELECT assignee, COUNT(*) FROM tasks WHERE status IN {_ACTIVE_TASK}"
            " AND assignee" + sql.IN_LIST + " GROUP BY assignee",
            (self._list(sorted(names)),),
        ):
            load[assignee] = int(count)
        return min(sorted(load), key=lambda n: load[n])

    @staticmethod
    def _escalate_at(
        policies: Sequence[dict[str, Any]], level: int, due_at: int | None, created_at: int
    ) -> int | None:
        if level >= len(policies):
            return None
        return (due_at if due_at is not None else created_at) + int(policies[level]["after_ms"])

    async def claim_task(self, task_id: str, who: Person) -> None:
        row = await self._task_row(task_id)
        status = TaskStatus(row[2])
        if not status.active:
            raise errors.InvalidState(f"Task {task_id} is {status}; it cannot be claimed.")
        if row[1] == who.id:
            return  # already theirs
        if not _candidate(row, who):
            raise errors.PermissionDenied(f"{who.id} is not a candidate for task {task_id}.")
        if row[1] is not None:
            raise errors.InvalidState(
                f"Task {task_id} is already claimed by {row[1]}; they can unclaim or delegate it."
            )
        self._four_eyes(task_id, row, who.id)
        await self._run(
            "UPDATE tasks SET status = 'claimed', assignee = ?, updated_at = ? WHERE id = ?",
            (who.id, self.now, task_id),
        )
        await self._task_event(task_id, "claimed", {"by": who.id})
        self.audit("task.claimed", "task:" + task_id, {"assignee": who.id})

    async def unclaim_task(self, task_id: str, who: Person) -> None:
        row = await self._task_row(task_id)
        if TaskStatus(row[2]) is not TaskStatus.CLAIMED:
            raise errors.InvalidState(f"Task {task_id} is {row[2]}, not claimed.")
        if row[1] != who.id and not who.privileged:
            raise errors.PermissionDenied(
                f"Task {task_id} is claimed by {row[1]}; only they (or an operator) can unclaim it."
            )
        await self._run(
            "UPDATE tasks SET status = 'open', assignee = NULL, updated_at = ? WHERE id = ?",
            (self.now, task_id),
        )
        await self._task_event(task_id, "unclaimed", {"was": row[1]})
        self.audit("task.unclaimed", "task:" + task_id, {"was": row[1]})

    @staticmethod
    def _four_eyes(task_id: str, row: Sequence[Any], user: str) -> None:
        if row[4] and row[3] is not None and row[3] == user:
            raise errors.FourEyesViolation(
                f"Task {task_id} needs a second person: {user} requested this work and "
                "cannot also approve it. Ask another candidate to complete it."
            )

    async def complete_task(
        self, task_id: str, who: Person, data: str, *, auto: str | None = None
    ) -> str:
        """Record the (already validated) form ``data`` and wake the run. ``auto`` names the
        reason when the system decides (an escalation's default); then no person is
        checked. Returns the run id."""
        row = await self._task_row(task_id)
        status = TaskStatus(row[2])
        if not status.active:
            raise errors.InvalidState(f"Task {task_id} is {status}; it cannot be completed.")
        if auto is None:
            if not _candidate(row, who):
                raise errors.PermissionDenied(f"{who.id} is not a candidate for task {task_id}.")
            if row[1] is not None and row[1] != who.id and not who.privileged:
                raise errors.PermissionDenied(
                    f"Task {task_id} is claimed by {row[1]}; only they can complete it."
                )
            self._four_eyes(task_id, row, who.id)
        run_id = str(row[5])
        task_seq = await self._one("SELECT seq FROM tasks WHERE id = ?", (task_id,))
        result = await self._seal(run_id, task_seq[0] if task_seq else 0, "task.result", data)
        await self._run(
            "UPDATE tasks SET status = 'completed', result = ?, completed_by = ?,"
            " completed_at = ?, escalate_at = NULL, draft = NULL, updated_at = ? WHERE id = ?",
            (result, who.id, self.now, self.now, task_id),
        )
        await self._task_event(task_id, "completed", {"by": who.id, "auto": auto})
        run = await self._one("SELECT status FROM runs WHERE id = ?", (run_id,))
        if run is not None and not base.RunStatus(run[0]).finished:
            payload = (
                '{"data":'
                + data
                + ',"by":'
                + json.dumps(who.id)
                + ',"auto":'
                + json.dumps(auto)
                + "}"
            )
            await self._deliver(run_id, people.TASK_SIGNAL + task_id, payload)
        self.audit(
            "task.completed",
            "task:" + task_id,
            {"by": who.id, "auto": auto, "result_sha256": audit.digest(result), "run_id": run_id},
        )
        return run_id

    async def delegate_task(self, task_id: str, who: Person, to_user: str) -> None:
        row = await self._task_row(task_id)
        if not TaskStatus(row[2]).active:
            raise errors.InvalidState(f"Task {task_id} is {row[2]}; it cannot be delegated.")
        if not who.privileged and row[1] != who.id:
            if row[1] is not None or not _candidate(row, who):
                raise errors.PermissionDenied(
                    f"Only the assignee of task {task_id} (or an operator) can delegate it."
                )
        target = await self._one("SELECT disabled FROM users WHERE id = ?", (to_user,))
        if target is None or target[0]:
            raise errors.NotFound(f"No active user {to_user!r} to delegate task {task_id} to.")
        # As for a claim: a four-eyes task never goes to the one person who cannot complete it.
        self._four_eyes(task_id, row, to_user)
        cands = json.loads(row[0])
        if to_user not in cands.setdefault("users", []):
            cands["users"].append(to_user)
        await self._run(
            "UPDATE tasks SET status = 'claimed', assignee = ?, candidates = ?, updated_at = ?"
            " WHERE id = ?",
            (to_user, json.dumps(cands), self.now, task_id),
        )
        await self._set_candidates(task_id, cands)
        await self._task_event(task_id, "delegated", {"from": row[1], "to": to_user})
        self.audit("task.delegated", "task:" + task_id, {"from": row[1], "to": to_user})

    async def comment_task(self, task_id: str, who: Person, text: str) -> None:
        row = await self._task_row(task_id)
        if not _candidate(row, who):
            raise errors.PermissionDenied(f"{who.id} is not a candidate for task {task_id}.")
        await self._task_event(task_id, "comment", {"text": text})
        self.audit("task.commented", "task:" + task_id, {"text_sha256": audit.digest(text)})

    async def save_draft(self, task_id: str, who: Person, draft: str) -> None:
        row = await self._task_row(task_id)
        if not TaskStatus(row[2]).active:
            raise errors.InvalidState(f"Task {task_id} is {row[2]}; its form is closed.")
        if not _candidate(row, who) or (
            row[1] is not None and row[1] != who.id and not who.privileged
        ):
            raise errors.PermissionDenied(f"{who.id} cannot edit the form of task {task_id}.")
        where = await self._one("SELECT run_id, seq FROM tasks WHERE id = ?", (task_id,))
        assert where is not None  # _task_row found it
        sealed = await self._seal(where[0], where[1], "task.draft", draft)
        await self._run(
            "UPDATE tasks SET draft = ?, updated_at = ? WHERE id = ?", (sealed, self.now, task_id)
        )

    async def escalate_task(self, task_id: str, level: int) -> people.Escalated | None:
        """Apply escalation ``level`` of a task whose time has come; None when another
        worker already did, or the task was completed meanwhile."""
        row = await self._task_row(task_id)
        if not TaskStatus(row[2]).active or row[8] != level or row[11] is None:
            return None
        if row[11] > self.now:
            return None
        policies: list[dict[str, Any]] = json.loads(row[7] or "[]")
        policy = policies[level]
        action = str(policy["action"])
        reason = str(policy.get("reason") or f"not done {policy['after_ms'] // 1000} s after due")
        to: list[str] = []
        self.actor = "system:escalation"
        if action == "reassign":
            cands: dict[str, list[str]] = {
                "users": list(policy.get("users", [])),
                "groups": list(policy.get("groups", [])),
                "roles": [],
            }
            if policy.get("to_manager"):
                current = [row[1]] if row[1] else json.loads(row[0]).get("users", [])
                for user in current:
                    m = await self._one("SELECT manager FROM users WHERE id = ?", (user,))
                    if m is not None and m[0] and m[0] not in cands["users"]:
                        cands["users"].append(m[0])  # once, however many report to them
            initiator = row[3] if row[4] else None
            if initiator is not None and initiator in cands["users"]:
                # Four-eyes: whoever asked for the work never becomes its decider, not even
                # as the manager an escalation climbs to.
                cands["users"].remove(initiator)
                reason += f" ({initiator} requested the work and may not decide it: left out)"
            if not cands["users"] and not cands["groups"]:
                reason += " (no one to reassign to: candidates kept)"
                cands = json.loads(row[0])
            to = cands["users"] + ["group:" + g for g in cands["groups"]]
            await self._run(
                "UPDATE tasks SET status = 'open', assignee = NULL, candidates = ?,"
                " updated_at = ? WHERE id = ?",
                (json.dumps(cands), self.now, task_id),
            )
            await self._set_candidates(task_id, cands)
        elif action == "notify":
            now_cands = json.loads(row[0])
            to = (
                [row[1]]
                if row[1]
                else now_cands.get("users", [])
                + ["group:" + g for g in now_cands.get("groups", [])]
                + ["role:" + r for r in now_cands.get("roles", [])]
            )
        elif action == "auto_decide":
            await self.complete_task(
                task_id,
                Person("system:escalation"),
                json.dumps(policy.get("decision")),
                auto=reason,
            )
        await self._task_event(
            task_id, "escalated", {"level": level, "action": action, "reason": reason, "to": to}
        )
        if action != "auto_decide":
            await self._run(
                "UPDATE tasks SET escalation_level = ?, escalate_at = ?, updated_at = ?"
                " WHERE id = ?",
                (
                    level + 1,
                    self._escalate_at(policies, level + 1, row[9], row[10]),
                    self.now,
                    task_id,
                ),
            )
        else:
            await self._run(
                "UPDATE tasks SET escalation_level = ? WHERE id = ?", (level + 1, task_id)
            )
        self.audit(
            "task.escalated",
            "task:" + task_id,
            {"level": level, "action": action, "reason": reason, "to": to},
        )
        return people.Escalated(
            task_id=task_id, run_id=str(row[5]), level=level, action=action, reason=reason, to=to
        )

    # -- users and tokens ----------------------------------------------------------------
    async def create_user(
        self,
        user_id: str,
        name: str,
        roles: Sequence[str],
        groups: Sequence[str],
        manager: str | None = None,
        password_hash: str | None = None,
    ) -> None:
        inserted = await self._run(
            "INSERT INTO users (id, name, roles, user_groups, manager, password_hash,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (
                user_id,
                name,
                json.dumps(sorted(set(roles))),
                json.dumps(sorted(set(groups))),
                manager,
                password_hash,
                self.now,
                self.now,
            ),
        )
        if not inserted:
            raise errors.Conflict(f"User {user_id!r} already exists.")
        self.audit(
            "user.created",
            "user:" + user_id,
            {"roles": sorted(set(roles)), "groups": sorted(set(groups)), "manager": manager},
        )

    async def update_user(
        self,
        user_id: str,
        *,
        roles: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        manager: str | None = None,
        disabled: bool | None = None,
    ) -> None:
        row = await self._one(
            "SELECT roles, user_groups, manager, disabled FROM users WHERE id = ?{update}",
            (user_id,),
        )
        if row is None:
            raise errors.NotFound(f"No user {user_id!r}. Create it with `flowdesk users create`.")
        new_roles = sorted(set(roles)) if roles is not None else json.loads(row[0])
        new_groups = sorted(set(groups)) if groups is not None else json.loads(row[1])
        new_manager = manager if manager is not None else row[2]
        new_disabled = bool(disabled) if disabled is not None else bool(row[3])
        await self._run(
            "UPDATE users SET roles = ?, user_groups = ?, manager = ?, disabled = ?,"
            " updated_at = ? WHERE id = ?",
            (
                json.dumps(new_roles),
                json.dumps(new_groups),
                new_manager,
                int(new_disabled),
                self.now,
                user_id,
            ),
        )
        if new_roles != json.loads(row[0]):
            self.audit(
                "user.roles_changed",
                "user:" + user_id,
                {"from": json.loads(row[0]), "to": new_roles},
            )
        if new_groups != json.loads(row[1]) or new_manager != row[2]:
            self.audit(
                "user.updated", "user:" + user_id, {"groups": new_groups, "manager": new_manager}
            )
        if new_disabled != bool(row[3]):
            self.audit("user.disabled" if new_disabled else "user.enabled", "user:" + user_id, {})

    async def create_token(
        self, token_id: str, user_id: str, secret_hash: str, name: str, expires_at: int | None
    ) -> None:
        user = await self._one("SELECT disabled FROM users WHERE id = ?", (user_id,))
        if user is None:
            raise errors.NotFound(f"No user {user_id!r}. Create it with `flowdesk users create`.")
        await self._run(
            "INSERT INTO tokens (id, user_id, secret_hash, name, created_at, expires_at)"
            " VALUES (?,?,?,?,?,?)",
            (token_id, user_id, secret_hash, name, self.now, expires_at),
        )
        self.audit(
            "token.created",
            "user:" + user_id,
            {"token_id": token_id, "name": name, "expires_at": expires_at},
        )

    async def revoke_token(self, token_id: str) -> None:
        row = await self._one(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
            " RETURNING user_id",
            (self.now, token_id),
        )
        if row is None:
            raise errors.NotFound(f"No active token {token_id!r}.")
        self.audit("token.revoked", "user:" + str(row[0]), {"token_id": token_id})

    # -- audit and retention -------------------------------------------------------------
    async def add_checkpoint(
        self, seq: int, hash_: str, at: int, key_id: str, signature: str
    ) -> None:
        await self._run(
            "INSERT INTO audit_checkpoints (seq, hash, at, key_id, signature)"
            " VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
            (seq, hash_, at, key_id, signature),
        )

    async def purge_runs(self, finished_before: int, limit: int) -> list[str]:
        """Delete the payloads of finished runs older than ``finished_before``: inputs,
        outputs, step results, signal payloads, task forms and drafts. Rows, statuses and
        the audit chain stay (the chain holds hashes, not payloads)."""
        ids = [
            r[0]
            for r in await self._all(
                "SELECT id FROM runs WHERE finished_at < ? AND purged_at IS NULL"
                " ORDER BY finished_at LIMIT ?",
                (finished_before, limit),
            )
        ]
        if not ids:
            return []
        lst = self._list(ids)
        await self._run(
            "UPDATE runs SET input = 'null', output = NULL, error = NULL, purged_at = ?"
            " WHERE id" + sql.IN_LIST,
            (self.now, lst),
        )
        await self._run(
            "UPDATE steps SET output = NULL, error = NULL WHERE run_id" + sql.IN_LIST, (lst,)
        )
        await self._run("UPDATE signals SET payload = NULL WHERE run_id" + sql.IN_LIST, (lst,))
        await self._run(
            "UPDATE tasks SET context = NULL, draft = NULL, result = NULL WHERE run_id"
            + sql.IN_LIST,
            (lst,),
        )
        self.audit(
            "retention.purged",
            "runs",
            {"runs": ids, "finished_before": finished_before},
            actor="system:retention",
        )
        return ids


class PeopleStore(sql.SqlStore):
    """Reads of users, tokens, tasks and the audit chain."""

    async def get_task(self, task_id: str) -> people.TaskRecord | None:
        rows = await self._read(f"SELECT {people.TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            return None
        return people.task_from_row(rows[0], await self.run_keys([rows[0][1]]))

    async def list_tasks(self, q: people.TaskQuery) -> people.TaskPage:
        where = ["1 = 1"]
        params: list[Any] = []
        who = q.viewer
        if who is not None and not who.privileged:
            where.append(
                "(assignee = ? OR EXISTS (SELECT 1 FROM task_candidates c WHERE c.task_id ="
                " tasks.id AND ((c.kind = 'user' AND c.name = ?) OR (c.kind = 'group' AND"
                " c.name" + sql.IN_LIST + ") OR (c.kind = 'role' AND c.name" + sql.IN_LIST + "))))"
            )
            params += [who.id, who.id, self._list(who.groups), self._list(who.roles)]
        if q.mine and who is not None:
            where.append("assignee = ?")
            params.append(who.id)
        if q.my_groups and who is not None:
            where.append(
                "EXISTS (SELECT 1 FROM task_candidates g WHERE g.task_id = tasks.id AND"
                " g.kind = 'group' AND g.name" + sql.IN_LIST + ")"
            )
            params.append(self._list(who.groups))
        if q.status:
            unknown = sorted(set(q.status) - set(TaskStatus._value2member_map_))
            if unknown:
                raise errors.FlowdeskError(
                    f"Unknown task status {', '.join(map(repr, unknown))}: use one of "
                    f"{', '.join(s.value for s in TaskStatus)}."
                )
            where.append("status" + sql.IN_LIST)
            params.append(self._list([TaskStatus(s).value for s in q.status]))
        if q.kind is not None:
            where.append("kind = ?")
            params.append(q.kind)
        if q.min_priority is not None:
            where.append("priority >= ?")
            params.append(q.min_priority)
        if q.overdue:
            where.append(f"due_at < ? AND status IN {_ACTIVE_TASK}")
            params.append(base.now_ms())
        if q.run_id is not None:
            where.append("run_id = ?")
            params.append(q.run_id)
        if q.cursor:
            created, task_id = sql.decode_cursor(q.cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created, created, task_id]
        limit = max(1, min(q.limit, 500))
        rows = await self._read(
            f"SELECT {people.TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit + 1),
        )
        keys = await self.run_keys([r[1] for r in rows[:limit]])
        items = [people.task_from_row(r, keys) for r in rows[:limit]]
        cursor = None
        if len(rows) > limit:
            cursor = sql.encode_cursor(rows[limit - 1][23], rows[limit - 1][0])
        return people.TaskPage(items, cursor)

    async def task_events(self, task_id: str) -> list[people.TaskEvent]:
        rows = await self._read(
            "SELECT id, task_id, at, actor, kind, data FROM task_events WHERE task_id = ?"
            " ORDER BY id",
            (task_id,),
        )
        return [
            people.TaskEvent(
                id=r[0],
                task_id=r[1],
                at=base.ms_to_dt(r[2]),  # type: ignore[arg-type]
                actor=r[3],
                kind=r[4],
                data=None if r[5] is None else json.loads(r[5]),
            )
            for r in rows
        ]

    async def due_escalations(self, limit: int = 100) -> list[tuple[str, int]]:
        rows = await self._read(
            "SELECT id, escalation_level FROM tasks WHERE escalate_at <= ?"
            f" AND escalate_at IS NOT NULL AND status IN {_ACTIVE_TASK}"
            " ORDER BY escalate_at LIMIT ?",
            (base.now_ms(), limit),
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    async def get_user(self, user_id: str) -> people.UserRecord | None:
        rows = await self._read(f"SELECT {people.USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return people.user_from_row(rows[0]) if rows else None

    async def list_users(self) -> list[people.UserRecord]:
        rows = await self._read(f"SELECT {people.USER_COLUMNS} FROM users ORDER BY id")
        return [people.user_from_row(r) for r in rows]

    async def password_hash(self, user_id: str) -> str | None:
        rows = await self._read("SELECT password_hash FROM users WHERE id = ?", (user_id,))
        return rows[0][0] if rows else None

    async def token_owner(
        self, secret_hash: str
    ) -> tuple[people.TokenRecord, people.UserRecord] | None:
        rows = await self._read(
            f"SELECT {people.TOKEN_COLUMNS} FROM tokens WHERE secret_hash = ?", (secret_hash,)
        )
        if not rows:
            return None
        token = people.token_from_row(rows[0])
        user = await self.get_user(token.user_id)
        return None if user is None else (token, user)

    async def list_tokens(self, user_id: str | None = None) -> list[people.TokenRecord]:
        if user_id is None:
            rows = await self._read(f"SELECT {people.TOKEN_COLUMNS} FROM tokens ORDER BY id")
        else:
            rows = await self._read(
                f"SELECT {people.TOKEN_COLUMNS} FROM tokens WHERE user_id = ? ORDER BY id",
                (user_id,),
            )
        return [people.token_from_row(r) for r in rows]

    async def audit_head(self) -> tuple[int, str]:
        rows = await self._read("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else (0, audit.GENESIS)

    async def audit_rows(
        self, after_seq: int, limit: int, subject: str | None = None
    ) -> list[Sequence[Any]]:
        """Raw rows ``(seq, at, actor, action, subject, data, data_hash, prev_hash, hash)``
        in chain order, after ``after_seq``."""
        if subject is None:
            return await self._read(
                "SELECT seq, at, actor, action, subject, data, data_hash, prev_hash, hash"
                " FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
        return await self._read(
            "SELECT seq, at, actor, action, subject, data, data_hash, prev_hash, hash"
            " FROM audit WHERE seq > ? AND subject = ? ORDER BY seq LIMIT ?",
            (after_seq, subject, limit),
        )

    async def audit_checkpoints(self) -> list[Sequence[Any]]:
        """Rows ``(seq, hash, at, key_id, signature)`` by seq."""
        return await self._read(
            "SELECT seq, hash, at, key_id, signature FROM audit_checkpoints ORDER BY seq"
        )
