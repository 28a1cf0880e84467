"""The inbox: what people do with human tasks.

Every operation names the person acting (a `Person`: user id, groups, roles; operators and
admins are ``privileged`` and may act on any task). Each one is a single transaction that
also appends its audit record; completing a task wakes its run in that same transaction.
A task a person is not a candidate for is invisible to them (`TaskNotFound`), unless they
are privileged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowdesk import codec, errors
from flowdesk.engine.app import App
from flowdesk.humans import forms
from flowdesk.store import people
from flowdesk.store.people import Person, TaskEvent, TaskPage, TaskQuery, TaskRecord


def visible(task: TaskRecord, who: Person | None) -> bool:
    return who is None or people.may_act(who, task.assignee, task.users, task.groups, task.roles)


class Inbox:
    def __init__(self, app: App) -> None:
        self.app = app

    async def tasks(
        self,
        who: Person | None = None,
        *,
        mine: bool = False,
        my_groups: bool = False,
        status: Sequence[str] = (),
        kind: str | None = None,
        min_priority: int | None = None,
        overdue: bool = False,
        run_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks ``who`` may see (every task when None), newest first, a page at a time."""
        await self.app.open()
        return await self.app.store.list_tasks(
            TaskQuery(
                viewer=who,
                mine=mine,
                my_groups=my_groups,
                status=tuple(status),
                kind=kind,
                min_priority=min_priority,
                overdue=overdue,
                run_id=run_id,
                limit=limit,
                cursor=cursor,
            )
        )

    async def get(self, task_id: str, who: Person | None = None) -> TaskRecord:
        await self.app.open()
        task = await self.app.store.get_task(task_id)
        if task is None or not visible(task, who):
            raise errors.TaskNotFound(task_id)
        return task

    async def events(self, task_id: str, who: Person | None = None) -> list[TaskEvent]:
        await self.get(task_id, who)
        return await self.app.store.task_events(task_id)

    async def claim(self, task_id: str, who: Person) -> TaskRecord:
        await self.get(task_id, who)
        await self.app.submit(lambda tx: tx.claim_task(task_id, who), actor=who.id)
        return await self.get(task_id, who)

    async def unclaim(self, task_id: str, who: Person) -> TaskRecord:
        await self.get(task_id, who)
        await self.app.submit(lambda tx: tx.unclaim_task(task_id, who), actor=who.id)
        return await self.get(task_id, who)

    async def complete(self, task_id: str, who: Person, data: Any) -> TaskRecord:
        """Validate ``data`` against the task's form and complete the task; the run wakes.
        Invalid data raises `InvalidForm` (field-level errors) and changes nothing."""
        task = await self.get(task_id, who)
        clean = forms.validate(task_id, task.form_schema, task.form_ref, data)
        encoded = codec.encode(clean, f"form data of task {task_id}")
        await self.app.submit(lambda tx: tx.complete_task(task_id, who, encoded), actor=who.id)
        self.app.wake()
        done = await self.get(task_id, who)
        if self.app.observer is not None:  # time to completion, by kind
            await self.app.observer.task_completed(done)
        return done

    async def delegate(self, task_id: str, who: Person, to_user: str) -> TaskRecord:
        await self.get(task_id, who)
        await self.app.submit(lambda tx: tx.delegate_task(task_id, who, to_user), actor=who.id)
        return await self.get(task_id)

    async def comment(self, task_id: str, who: Person, text: str) -> TaskEvent:
        if not text.strip():
            raise errors.InvalidForm(task_id, [{"field": "text", "message": "empty comment"}])
        await self.get(task_id, who)
        await self.app.submit(lambda tx: tx.comment_task(task_id, who, text), actor=who.id)
        return (await self.app.store.task_events(task_id))[-1]

    async def save_draft(self, task_id: str, who: Person, draft: Any) -> TaskRecord:
        """Keep what the person typed so far (not validated: a draft may be incomplete)."""
        await self.get(task_id, who)
        encoded = codec.encode(draft, f"draft of task {task_id}")
        await self.app.submit(lambda tx: tx.save_draft(task_id, who, encoded), actor=who.id)
        return await self.get(task_id, who)
