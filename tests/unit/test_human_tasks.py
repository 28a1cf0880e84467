"""Human tasks: ``ctx.human_task`` suspends the run on a durable task; the inbox lists,
claims, delegates and completes it; escalations fire from the workers' upkeep loop."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, Field, model_validator

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.engine.tasks import Assignees, Escalated, Escalation
from flowdesk.governance.identity import Identity
from flowdesk.humans.inbox import Inbox
from flowdesk.store.people import Person, TaskRecord, TaskStatus


class Approval(BaseModel):
    """The form of every task here. A rejection needs a note: a rule of the model that its
    JSON Schema cannot express."""

    approved: bool
    amount: int = Field(ge=0)
    note: str = ""

    @model_validator(mode="after")
    def _rejection_has_a_note(self) -> Approval:
        if not self.approved and not self.note:
            raise ValueError("a rejection needs a note")
        return self


YES = {"approved": True, "amount": 42, "note": "fine"}

ALICE = Person("alice")  # starts the runs (their initiator)
BOB = Person("bob", groups=("finance",))
CAROL = Person("carol", roles=("approver",))
DAVE = Person("dave")
ERIN = Person("erin", groups=("sales",), roles=("viewer",))
OLGA = Person("olga", roles=("operator",), privileged=True)


def _register(
    app: flowdesk.App,
    calls: Counter[str],
    escalation: Escalation | Sequence[Escalation] | None = None,
) -> None:
    """The workflow ``review``: a step, a human task (shaped by the ``spec`` input), and a
    step that records the decision. ``calls`` counts step executions and workflow entries."""

    @app.step(name="prepare")
    async def prepare(amount: int) -> int:
        calls["prepare"] += 1
        return amount * 2

    @app.step(name="record")
    async def record(approved: bool) -> str:
        calls["record"] += 1
        return "approved" if approved else "rejected"

    @app.workflow("review")
    async def review(
        ctx: flowdesk.Context, amount: int = 21, spec: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        calls["entered"] += 1
        s = spec or {}
        prepared = await ctx.step(prepare, amount)
        due = s.get("due_ms")
        follow = s.get("follow_up_ms")
        decision = await ctx.human_task(
            s.get("kind", "approval"),
            title=f"Approve {amount}",
            form=Approval,
            context={"amount": amount, "suggestion": "approve", "confidence": 0.9},
            candidates=Assignees(
                users=s.get("users", []),
                groups=s.get("groups", []),
                roles=s.get("roles", []),
                strategy=s.get("strategy", "claim"),
            ),
            due=None if due is None else timedelta(milliseconds=due),
            follow_up=None if follow is None else timedelta(milliseconds=follow),
            priority=s.get("priority", 0),
            labels=s.get("labels", []),
            escalation=escalation,
            four_eyes=s.get("four_eyes", False),
        )
        outcome = await ctx.step(record, decision.approved)
        return {
            "prepared": prepared,
            "form": type(decision).__name__,
            "approved": decision.approved,
            "amount": decision.amount,
            "note": decision.note,
            "outcome": outcome,
        }


def _task_id(run_id: str, seq: int = 2) -> str:
    """The task of ``review`` is its second call (after the step ``prepare``)."""
    return f"{run_id}-t{seq}"


async def _start(app: flowdesk.App, wait_status: Any, **spec: Any) -> tuple[str, str]:
    """Start ``review`` (initiator alice), wait for it to park on its task; (run, task)."""
    h = await app.start("review", {"amount": 21, "spec": spec}, initiator="alice")
    await wait_status(app, h.id, RunStatus.WAITING)
    return h.id, _task_id(h.id)


async def _task(app: flowdesk.App, task_id: str) -> TaskRecord:
    return await Inbox(app).get(task_id)


def _audit(query: Any, action: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(actor, data) of the audit records ``action`` about the task."""
    return [
        (actor, json.loads(data))
        for actor, data in query(
            "SELECT actor, data FROM audit WHERE action = ? AND subject = ? ORDER BY seq",
            (action, "task:" + task_id),
        )
    ]


def _ids(tasks: Sequence[TaskRecord]) -> set[str]:
    return {t.id for t in tasks}


# -- 1. suspend, then resume on another worker --------------------------------------------


async def test_a_task_suspends_the_run_and_completion_resumes_it_on_another_worker(
    make_app, wait_status, wait_until, query
):
    first_calls: Counter[str] = Counter()
    first = make_app()
    _register(first, first_calls)
    async with first, first.worker(concurrency=4) as w1:
        run_id, task_id = await _start(
            first,
            wait_status,
            users=["bob"],
            groups=["finance"],
            roles=["approver"],
            due_ms=60_000,
            four_eyes=True,
        )
        await wait_until(lambda: w1.in_flight == 0, what="no coroutine held")
        assert not w1.holds(run_id)
        run = await first.get_run(run_id)
        assert run.status is RunStatus.WAITING and run.lease_owner is None
        assert run.waiting_for == ["flowdesk.task:" + task_id]
        task = await _task(first, task_id)
        steps = await first.steps(run_id)
    assert [(s.seq, s.name, s.kind, s.status) for s in steps] == [
        (1, "prepare", "step", "ok"),
        (2, "task:approval", "task", "pending"),
    ]
    assert task.status is TaskStatus.OPEN
    assert (task.run_id, task.seq, task.kind, task.title) == (run_id, 2, "approval", "Approve 21")
    assert task.context == {"amount": 21, "suggestion": "approve", "confidence": 0.9}
    assert (task.users, task.groups, task.roles) == (["bob"], ["finance"], ["approver"])
    assert task.assignee is None and task.initiator == "alice" and task.four_eyes
    assert task.form_schema == Approval.model_json_schema()
    assert first_calls == Counter({"entered": 1, "prepare": 1})

    # The first process is gone; the run and its task live in the database only.
    second_calls: Counter[str] = Counter()
    second = make_app()
    _register(second, second_calls)
    async with second:
        done = await Inbox(second).complete(task_id, BOB, YES)
        assert done.status is TaskStatus.COMPLETED
        assert (done.completed_by, done.result) == ("bob", YES)
        assert done.completed_at is not None
        # Completing queued the run; no worker has taken it yet.
        assert (await second.get_run(run_id)).status is RunStatus.QUEUED
        async with second.worker(concurrency=4):
            result = await second.result(run_id, timeout=15)
        steps = await second.steps(run_id)
    assert result == {
        "prepared": 42,
        "form": "Approval",  # the workflow got the validated model, not a dict
        "approved": True,
        "amount": 42,
        "note": "fine",
        "outcome": "approved",
    }
    assert [(s.seq, s.name, s.status) for s in steps] == [
        (1, "prepare", "ok"),
        (2, "task:approval", "ok"),
        (3, "record", "ok"),
    ]
    assert steps[1].output is not None and steps[1].output["data"] == YES
    assert steps[1].output["by"] == "bob"
    # The second worker replayed the workflow and ran only what came after the task.
    assert second_calls == Counter({"entered": 1, "record": 1})
    assert first_calls == Counter({"entered": 1, "prepare": 1})
    assert _audit(query, "task.completed", task_id)[0][0] == "bob"


# -- 2. replay ----------------------------------------------------------------------------


async def test_replay_after_completion_reruns_no_step_and_creates_no_second_task(
    app, wait_status, wait_until, query
):
    calls: Counter[str] = Counter()

    @app.step(name="count")
    async def count() -> int:
        calls["count"] += 1
        return calls["count"]

    @app.workflow("two_approvals")
    async def two_approvals(ctx: flowdesk.Context) -> list[Any]:
        calls["entered"] += 1
        n = await ctx.step(count)
        first = await ctx.human_task(
            "first", title="First", form=Approval, candidates=Assignees(users=["bob"])
        )
        second = await ctx.human_task(
            "second", title="Second", form=Approval, candidates=Assignees(users=["carol"])
        )
        return [n, first.amount, second.amount]

    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        h = await app.start("two_approvals")
        await wait_status(app, h.id, RunStatus.WAITING)
        await inbox.complete(f"{h.id}-t2", BOB, {"approved": True, "amount": 1})

        async def waits_for_second() -> bool:
            run = await app.get_run(h.id)
            return run.waiting_for == [f"flowdesk.task:{h.id}-t3"]

        await wait_until(waits_for_second, what="the replayed run parks on the second task")
        await inbox.complete(f"{h.id}-t3", CAROL, {"approved": True, "amount": 2})
        assert await app.result(h.id, timeout=15) == [1, 1, 2]
        steps = await app.steps(h.id)

    assert calls == Counter({"entered": 3, "count": 1})  # replayed twice, the step ran once
    assert [(s.seq, s.name, s.status) for s in steps] == [
        (1, "count", "ok"),
        (2, "task:first", "ok"),
        (3, "task:second", "ok"),
    ]
    rows = query("SELECT id, status FROM tasks WHERE run_id = ? ORDER BY seq", (h.id,))
    assert rows == [(f"{h.id}-t2", "completed"), (f"{h.id}-t3", "completed")]
    for task_id in (f"{h.id}-t2", f"{h.id}-t3"):
        assert len(_audit(query, "task.created", task_id)) == 1
        assert len(_audit(query, "task.completed", task_id)) == 1


# -- 3. fields and drafts -----------------------------------------------------------------


async def test_priority_labels_due_follow_up_and_a_draft_cleared_on_completion(
    app, wait_status, query
):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(
            app,
            wait_status,
            users=["bob"],
            priority=7,
            labels=["finance", "urgent"],
            due_ms=3_600_000,
            follow_up_ms=1_800_000,
        )
        task = await inbox.get(task_id, BOB)
        assert task.priority == 7
        assert task.labels == ["finance", "urgent"]
        assert task.due_at is not None and task.follow_up_at is not None
        # Both come from the same instant of the workflow.
        assert task.due_at - task.follow_up_at == timedelta(minutes=30)
        assert timedelta(minutes=59) < task.due_at - task.created_at <= timedelta(hours=1)
        assert not task.overdue(datetime.now(UTC))
        assert task.draft is None

        partial = {"approved": True, "note": "half typed"}  # a draft need not be valid
        saved = await inbox.save_draft(task_id, BOB, partial)
        assert saved.draft == partial
        assert (await inbox.get(task_id, BOB)).draft == partial
        assert saved.status is TaskStatus.OPEN
        with pytest.raises(errors.TaskNotFound):
            await inbox.save_draft(task_id, ERIN, {"approved": False})

        done = await inbox.complete(task_id, BOB, YES)
        assert done.draft is None
        assert done.result == YES
        assert (await app.result(run_id, timeout=15))["approved"] is True
        with pytest.raises(errors.InvalidState):
            await inbox.save_draft(task_id, BOB, partial)  # the form is closed
    [(draft, result)] = query("SELECT draft, result FROM tasks WHERE id = ?", (task_id,))
    # The draft is gone from the row; the form data is stored sealed (read back above).
    assert draft is None and result.startswith("$fd1$") and "approved" not in result


# -- 4. assignment ------------------------------------------------------------------------


async def test_candidates_see_claim_unclaim_delegate_comment_and_complete(app, wait_status, query):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    ids = Identity(app)
    async with app, app.worker(concurrency=4):
        # frank is no candidate (the inbox leaves role checks to the API) until delegated to.
        frank = (await ids.create_user("frank", roles=["viewer"], groups=["legal"])).person()
        run_id, task_id = await _start(
            app, wait_status, users=["dave"], groups=["finance"], roles=["approver"]
        )
        # dave by name, bob through his group, carol through her role, olga as operator.
        for who in (DAVE, BOB, CAROL, OLGA):
            page = await inbox.tasks(who)
            assert _ids(page.items) == {task_id}, who.id
            assert (await inbox.get(task_id, who)).id == task_id
        # Nobody else sees it, or can act on it.
        for who in (ERIN, frank, ALICE):
            assert (await inbox.tasks(who)).items == [], who.id
            with pytest.raises(errors.TaskNotFound):
                await inbox.get(task_id, who)
            with pytest.raises(errors.TaskNotFound):
                await inbox.claim(task_id, who)
            with pytest.raises(errors.TaskNotFound):
                await inbox.complete(task_id, who, YES)

        claimed = await inbox.claim(task_id, BOB)
        assert (claimed.status, claimed.assignee) == (TaskStatus.CLAIMED, "bob")
        assert (await inbox.claim(task_id, BOB)).assignee == "bob"  # claiming again: a no-op
        with pytest.raises(errors.InvalidState):
            await inbox.claim(task_id, CAROL)
        with pytest.raises(errors.PermissionDenied):
            await inbox.complete(task_id, CAROL, YES)  # bob holds it
        with pytest.raises(errors.PermissionDenied):
            await inbox.unclaim(task_id, CAROL)
        assert _ids((await inbox.tasks(BOB, mine=True)).items) == {task_id}
        assert (await inbox.tasks(CAROL, mine=True)).items == []

        released = await inbox.unclaim(task_id, BOB)
        assert (released.status, released.assignee) == (TaskStatus.OPEN, None)

        assert (await inbox.claim(task_id, CAROL)).assignee == "carol"
        delegated = await inbox.delegate(task_id, CAROL, "frank")
        assert (delegated.status, delegated.assignee) == (TaskStatus.CLAIMED, "frank")
        assert "frank" in delegated.users
        with pytest.raises(errors.NotFound):
            await inbox.delegate(task_id, frank, "nobody")
        # frank now sees it as his own; carol still sees it but can no longer complete it.
        assert _ids((await inbox.tasks(frank, mine=True)).items) == {task_id}
        with pytest.raises(errors.PermissionDenied):
            await inbox.complete(task_id, CAROL, YES)

        note = await inbox.comment(task_id, DAVE, "please check the amount")
        assert (note.kind, note.actor, note.data) == (
            "comment",
            "dave",
            {"text": "please check the amount"},
        )
        with pytest.raises(errors.InvalidForm):
            await inbox.comment(task_id, DAVE, "   ")

        done = await inbox.complete(task_id, frank, YES)
        assert (done.status, done.completed_by) == (TaskStatus.COMPLETED, "frank")
        assert (await app.result(run_id, timeout=15))["outcome"] == "approved"
        events = await inbox.events(task_id, DAVE)

    assert [(e.kind, e.actor) for e in events] == [
        ("claimed", "bob"),
        ("unclaimed", "bob"),
        ("claimed", "carol"),
        ("delegated", "carol"),
        ("comment", "dave"),
        ("completed", "frank"),
    ]
    assert events[3].data == {"from": "carol", "to": "frank"}
    actions = [
        a
        for (a,) in query(
            "SELECT action FROM audit WHERE subject = ? ORDER BY seq", ("task:" + task_id,)
        )
    ]
    assert actions == [
        "task.created",
        "task.claimed",
        "task.unclaimed",
        "task.claimed",
        "task.delegated",
        "task.commented",
        "task.completed",
    ]


async def test_workload_assigns_the_candidate_with_the_fewest_open_tasks(app, wait_status):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    ids = Identity(app)
    async with app, app.worker(concurrency=4):
        bob = (await ids.create_user("bob", roles=["approver"], groups=["team"])).person()
        carol = (await ids.create_user("carol", roles=["approver"], groups=["team"])).person()
        await ids.create_user("dave", roles=["approver"], groups=["other"])
        # bob already has two tasks; carol has none.
        for _ in range(2):
            _, preload = await _start(app, wait_status, users=["bob"], strategy="workload")
            assert (await _task(app, preload)).assignee == "bob"

        assigned = []
        for _ in range(3):
            _, task_id = await _start(app, wait_status, groups=["team"], strategy="workload")
            task = await _task(app, task_id)
            assert task.status is TaskStatus.CLAIMED
            assigned.append(task.assignee)
        # carol until both carry two; then the tie goes to the first id.
        assert assigned == ["carol", "carol", "bob"]
        assert len((await inbox.tasks(carol, mine=True)).items) == 2
        assert len((await inbox.tasks(bob, mine=True)).items) == 3
        # A completed task no longer counts: carol drops to one, and gets the next.
        await inbox.complete((await inbox.tasks(carol, mine=True)).items[0].id, carol, YES)
        _, task_id = await _start(app, wait_status, groups=["team"], strategy="workload")
        assert (await _task(app, task_id)).assignee == "carol"


# -- 5. inbox filters and pages -----------------------------------------------------------


async def test_inbox_filters(app, wait_status, wait_until):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    async with app, app.worker(concurrency=8):
        _, mine = await _start(app, wait_status, users=["bob"], priority=1)
        _, group_low = await _start(app, wait_status, groups=["finance"], priority=5)
        late_run, late = await _start(
            app, wait_status, kind="review", groups=["finance"], priority=9, due_ms=1
        )
        _, done = await _start(app, wait_status, kind="review", users=["bob"], due_ms=1)
        _, other = await _start(app, wait_status, users=["carol"], priority=9, due_ms=1)
        await inbox.claim(mine, BOB)
        await inbox.complete(done, BOB, YES)

        async def listed(**filters: Any) -> set[str]:
            return _ids((await inbox.tasks(BOB, **filters)).items)

        assert await listed() == {mine, group_low, late, done}
        assert await listed(mine=True) == {mine}
        assert await listed(my_groups=True) == {group_low, late}
        assert await listed(status=["open"]) == {group_low, late}
        assert await listed(status=["claimed"]) == {mine}
        assert await listed(status=["completed"]) == {done}
        assert await listed(status=["open", "claimed"]) == {mine, group_low, late}
        assert await listed(kind="review") == {late, done}
        assert await listed(kind="approval") == {mine, group_low}
        assert await listed(min_priority=5) == {group_low, late}
        assert await listed(run_id=late_run) == {late}
        assert await listed(kind="review", min_priority=5, my_groups=True) == {late}

        async def overdue_listed() -> bool:
            return await listed(overdue=True) == {late}  # done is due too, but completed

        await wait_until(overdue_listed, what="the task past its due time is overdue")
        assert (await _task(app, late)).overdue(datetime.now(UTC))
        # Every task, for a caller who names nobody; the overdue ones of everybody.
        everything = _ids((await inbox.tasks()).items)
        assert everything == {mine, group_low, late, done, other}
        assert _ids((await inbox.tasks(overdue=True)).items) == {late, other}
        with pytest.raises(errors.FlowdeskError, match="Unknown task status 'bogus'"):
            await inbox.tasks(BOB, status=["open", "bogus"])


async def test_cursor_pages_yield_every_task_exactly_once(app, wait_status):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    pat = Person("pat")
    async with app, app.worker(concurrency=8):
        made = []
        for _ in range(7):
            made.append((await _start(app, wait_status, users=["pat"]))[1])
        await _start(app, wait_status, users=["quinn"])  # not pat's

        seen: list[str] = []
        sizes: list[int] = []
        cursor: str | None = None
        while True:
            page = await inbox.tasks(pat, limit=3, cursor=cursor)
            seen += [t.id for t in page.items]
            sizes.append(len(page.items))
            cursor = page.next_cursor
            if cursor is None:
                break
    assert sizes == [3, 3, 1]
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == set(made)
    assert seen == list(reversed(made))  # newest first


# -- 6. invalid form data -----------------------------------------------------------------


async def test_invalid_form_data_is_refused_field_by_field_and_changes_nothing(
    app, wait_status, query
):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(app, wait_status, users=["bob"])
        await inbox.claim(task_id, BOB)

        with pytest.raises(errors.InvalidForm) as bad_types:
            await inbox.complete(task_id, BOB, {"approved": "maybe", "amount": -5})
        assert bad_types.value.task_id == task_id
        assert {e["field"] for e in bad_types.value.errors} == {"approved", "amount"}

        with pytest.raises(errors.InvalidForm) as missing:
            await inbox.complete(task_id, BOB, {"amount": 3})
        assert [e["field"] for e in missing.value.errors] == ["approved"]

        with pytest.raises(errors.InvalidForm) as extra_rule:  # the model's own rule
            await inbox.complete(task_id, BOB, {"approved": False, "amount": 3})
        assert "a rejection needs a note" in str(extra_rule.value)

        with pytest.raises(errors.InvalidForm):
            await inbox.complete(task_id, BOB, ["not", "an", "object"])

        task = await _task(app, task_id)
        assert (task.status, task.assignee, task.result) == (TaskStatus.CLAIMED, "bob", None)
        assert task.completed_by is None and task.completed_at is None
        run = await app.get_run(run_id)
        assert run.status is RunStatus.WAITING
        assert _audit(query, "task.completed", task_id) == []
        assert query("SELECT COUNT(*) FROM signals WHERE run_id = ?", (run_id,)) == [(0,)]
        assert [e.kind for e in await inbox.events(task_id, BOB)] == ["claimed"]
        assert calls["record"] == 0

        # Valid data still completes it.
        await inbox.complete(task_id, BOB, {"approved": False, "amount": 0, "note": "no"})
        result = await app.result(run_id, timeout=15)
    assert (result["approved"], result["note"], result["outcome"]) == (False, "no", "rejected")
    assert len(_audit(query, "task.completed", task_id)) == 1


# -- 7. four eyes -------------------------------------------------------------------------


async def test_four_eyes_the_initiator_cannot_complete_even_as_candidate_or_operator(
    app, wait_status, query
):
    calls: Counter[str] = Counter()
    _register(app, calls)
    inbox = Inbox(app)
    alice_operator = Person("alice", roles=("operator",), privileged=True)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(app, wait_status, users=["alice", "bob"], four_eyes=True)
        task = await _task(app, task_id)
        assert (task.initiator, task.four_eyes) == ("alice", True)
        assert _ids((await inbox.tasks(ALICE)).items) == {task_id}  # she may look at it

        for who in (ALICE, alice_operator):
            with pytest.raises(errors.FourEyesViolation):
                await inbox.complete(task_id, who, YES)
            with pytest.raises(errors.FourEyesViolation):
                await inbox.claim(task_id, who)
        task = await _task(app, task_id)
        assert (task.status, task.assignee) == (TaskStatus.OPEN, None)
        assert (await app.get_run(run_id)).status is RunStatus.WAITING
        assert _audit(query, "task.completed", task_id) == []

        # Nor can the task be handed to her: it would sit with the one person who cannot
        # complete it.
        await Identity(app).create_user("alice", roles=["approver"])
        await inbox.claim(task_id, BOB)
        with pytest.raises(errors.FourEyesViolation):
            await inbox.delegate(task_id, BOB, "alice")
        with pytest.raises(errors.FourEyesViolation):
            await inbox.delegate(task_id, OLGA, "alice")
        assert (await _task(app, task_id)).assignee == "bob"
        assert _audit(query, "task.delegated", task_id) == []

        done = await inbox.complete(task_id, BOB, YES)
        assert done.completed_by == "bob"
        assert (await app.result(run_id, timeout=15))["approved"] is True

        # Without four_eyes the initiator may complete her own task.
        own_run, own_task = await _start(app, wait_status, users=["alice"])
        await inbox.complete(own_task, ALICE, YES)
        assert (await app.result(own_run, timeout=15))["approved"] is True

        # workload never assigns a four-eyes task to its initiator ("alice" < "bob").
        _, assigned = await _start(
            app, wait_status, users=["alice", "bob"], strategy="workload", four_eyes=True
        )
        assert (await _task(app, assigned)).assignee == "bob"


# -- 8. escalations -----------------------------------------------------------------------


class Collect:
    """A notifier that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[Escalated] = []

    async def __call__(self, event: Escalated) -> None:
        self.events.append(event)


def _level(query: Any, task_id: str) -> int:
    return int(query("SELECT escalation_level FROM tasks WHERE id = ?", (task_id,))[0][0])


async def test_reassign_to_a_group_after_the_due_time(app, wait_status, wait_until, query):
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.reassign(groups=["managers"], reason="bob is away"))
    inbox = Inbox(app)
    mona = Person("mona", groups=("managers",))
    async with app, app.worker(concurrency=4):
        # workload hands it to bob at once; the escalation takes it away from him.
        run_id, task_id = await _start(
            app, wait_status, users=["bob"], strategy="workload", due_ms=30
        )
        # (Read from the audit: the escalation may fire any moment now.)
        [(_, created)] = _audit(query, "task.created", task_id)
        assert created["assignee"] == "bob"

        await wait_until(lambda: _level(query, task_id) == 1, what="the escalation fired")
        task = await _task(app, task_id)
        assert (task.status, task.assignee) == (TaskStatus.OPEN, None)
        assert (task.users, task.groups, task.roles) == ([], ["managers"], [])
        assert task.escalate_at is None  # no stage left
        assert (await app.get_run(run_id)).status is RunStatus.WAITING
        events = await inbox.events(task_id, mona)
        assert [(e.kind, e.actor, e.data) for e in events] == [
            (
                "escalated",
                "system:escalation",
                {
                    "level": 0,
                    "action": "reassign",
                    "reason": "bob is away",
                    "to": ["group:managers"],
                },
            )
        ]
        assert _audit(query, "task.escalated", task_id) == [
            (
                "system:escalation",
                {
                    "level": 0,
                    "action": "reassign",
                    "reason": "bob is away",
                    "to": ["group:managers"],
                },
            )
        ]
        # The new candidates have it; bob no longer does.
        assert _ids((await inbox.tasks(mona, my_groups=True)).items) == {task_id}
        assert (await inbox.tasks(BOB)).items == []
        with pytest.raises(errors.TaskNotFound):
            await inbox.complete(task_id, BOB, YES)
        await inbox.complete(task_id, mona, YES)
        assert (await app.result(run_id, timeout=15))["approved"] is True


async def test_reassign_to_the_manager(app, wait_status, wait_until, query):
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.reassign(to_manager=True))
    inbox = Inbox(app)
    ids = Identity(app)
    async with app, app.worker(concurrency=4):
        mia = (await ids.create_user("mia", roles=["approver"])).person()
        max_ = (await ids.create_user("max", roles=["approver"])).person()
        await ids.create_user("bob", roles=["approver"], manager="mia")
        await ids.create_user("carol", roles=["approver"], manager="max")
        await ids.create_user("dan", roles=["approver"], manager="mia")
        # Offered to bob, carol and dan: their managers take over (mia once, for two).
        offered_run, offered = await _start(
            app, wait_status, users=["bob", "carol", "dan"], due_ms=30
        )
        # Assigned to bob (workload, tie by id): only bob's manager takes over.
        _, assigned = await _start(
            app, wait_status, users=["bob", "carol"], strategy="workload", due_ms=30
        )
        [(_, created)] = _audit(query, "task.created", assigned)
        assert created["assignee"] == "bob"

        for task_id in (offered, assigned):
            await wait_until(lambda t=task_id: _level(query, t) == 1, what="escalated")
        offered_task = await _task(app, offered)
        assert (offered_task.status, offered_task.users) == (TaskStatus.OPEN, ["mia", "max"])
        assigned_task = await _task(app, assigned)
        assert (assigned_task.status, assigned_task.assignee) == (TaskStatus.OPEN, None)
        assert assigned_task.users == ["mia"]
        assert [a[1]["to"] for a in _audit(query, "task.escalated", offered)] == [["mia", "max"]]
        assert [a[1]["to"] for a in _audit(query, "task.escalated", assigned)] == [["mia"]]

        assert _ids((await inbox.tasks(mia)).items) == {offered, assigned}
        assert _ids((await inbox.tasks(max_)).items) == {offered}
        assert (await inbox.tasks(BOB)).items == []
        await inbox.complete(offered, max_, YES)
        assert (await app.result(offered_run, timeout=15))["approved"] is True


async def test_notify_tells_the_notifier_and_changes_nothing_else(
    make_app, wait_status, wait_until
):
    notified = Collect()
    app = make_app(notifier=notified)
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.notify(reason="a reminder"))
    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(
            app, wait_status, users=["bob"], groups=["finance"], due_ms=30
        )
        await wait_until(lambda: notified.events, what="the notifier was told")
        assert notified.events == [
            Escalated(
                task_id=task_id,
                run_id=run_id,
                level=0,
                action="notify",
                reason="a reminder",
                to=["bob", "group:finance"],
            )
        ]
        task = await _task(app, task_id)
        assert (task.status, task.assignee) == (TaskStatus.OPEN, None)
        assert (task.users, task.groups) == (["bob"], ["finance"])
        assert (task.escalation_level, task.escalate_at) == (1, None)
        assert task.result is None and task.completed_by is None
        assert (await app.get_run(run_id)).status is RunStatus.WAITING
        assert [e.kind for e in await inbox.events(task_id, BOB)] == ["escalated"]
        await inbox.complete(task_id, BOB, YES)
        assert (await app.result(run_id, timeout=15))["approved"] is True
    assert len(notified.events) == 1


async def test_auto_decide_resumes_the_run_with_the_default_decision(app, wait_status, query):
    default = Approval(approved=False, amount=0, note="no answer: rejected")
    reason = "no answer within the SLA"
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.auto_decide(default, reason=reason))
    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(app, wait_status, users=["bob"], due_ms=30)
        result = await app.result(run_id, timeout=15)
        task = await _task(app, task_id)
        events = await inbox.events(task_id)
        steps = await app.steps(run_id)
    assert result == {
        "prepared": 42,
        "form": "Approval",
        "approved": False,
        "amount": 0,
        "note": "no answer: rejected",
        "outcome": "rejected",
    }
    assert task.status is TaskStatus.COMPLETED
    assert task.completed_by == "system:escalation"
    assert task.result == default.model_dump(mode="json")
    assert (task.escalation_level, task.escalate_at) == (1, None)
    assert [(e.kind, e.actor, e.data) for e in events] == [
        ("completed", "system:escalation", {"by": "system:escalation", "auto": reason}),
        (
            "escalated",
            "system:escalation",
            {"level": 0, "action": "auto_decide", "reason": reason, "to": []},
        ),
    ]
    completed = _audit(query, "task.completed", task_id)
    assert [(actor, data["by"], data["auto"]) for actor, data in completed] == [
        ("system:escalation", "system:escalation", reason)
    ]
    assert [data["reason"] for _, data in _audit(query, "task.escalated", task_id)] == [reason]
    assert steps[1].output is not None
    assert (steps[1].output["by"], steps[1].output["auto"]) == ("system:escalation", reason)


async def _past(when: datetime | None, wait_until: Any) -> None:
    assert when is not None
    await wait_until(lambda: datetime.now(UTC) > when, what=f"{when} has passed")


async def test_an_escalation_survives_a_restart_and_fires_once_among_two_workers(
    make_app, wait_status, wait_until, query
):
    notified = Collect()
    calls: Counter[str] = Counter()
    policy = Escalation.reassign(groups=["managers"], reason="overdue")
    # The first process checks no escalations while it lives (its upkeep loop would first
    # look after poll_interval): it only creates the task.
    first = make_app(poll_interval=5.0, notifier=notified)
    _register(first, calls, policy)
    async with first, first.worker(concurrency=4):
        run_id, task_id = await _start(first, wait_status, users=["bob"], due_ms=30)
        task = await _task(first, task_id)
    assert (task.escalation_level, task.escalate_at) == (0, task.due_at)
    await _past(task.escalate_at, wait_until)
    assert _level(query, task_id) == 0  # due, but no worker runs

    apps = [make_app(notifier=notified) for _ in range(2)]
    checked: list[int] = [0, 0]
    for i, other in enumerate(apps):
        _register(other, calls, policy)

        async def hook(i: int = i) -> None:  # runs right after the worker's escalation check
            checked[i] += 1

        other.upkeep_hooks.append(hook)
    async with apps[0], apps[1], apps[0].worker(concurrency=4), apps[1].worker(concurrency=4):
        await wait_until(lambda: min(checked) >= 2, what="both workers checked twice")
        task = await _task(apps[0], task_id)
        events = await Inbox(apps[0]).events(task_id)
        run = await apps[0].get_run(run_id)
    assert (task.escalation_level, task.status, task.groups) == (1, TaskStatus.OPEN, ["managers"])
    assert [e.kind for e in events] == ["escalated"]
    assert len(_audit(query, "task.escalated", task_id)) == 1
    assert [(e.task_id, e.level, e.action) for e in notified.events] == [(task_id, 0, "reassign")]
    assert run.status is RunStatus.WAITING


async def test_concurrent_escalations_of_one_level_apply_once(
    make_app, wait_status, wait_until, query
):
    # Two stages, both due at once: only the level check keeps a late duplicate of stage 0
    # from being applied again (the task is still due, for stage 1).
    calls: Counter[str] = Counter()
    policy = [Escalation.reassign(groups=["managers"]), Escalation.notify(reason="second")]
    first = make_app(poll_interval=5.0)
    _register(first, calls, policy)
    async with first, first.worker(concurrency=4):
        _, task_id = await _start(first, wait_status, users=["bob"], due_ms=30)
        task = await _task(first, task_id)
    await _past(task.escalate_at, wait_until)

    apps = [make_app(), make_app()]
    async with apps[0], apps[1]:
        for level in (0, 1):
            outcomes = await asyncio.gather(
                *(
                    a.submit(
                        lambda tx, lv=level: tx.escalate_task(task_id, lv),
                        actor="system:escalation",
                    )
                    for a in (*apps, *apps)
                )
            )
            applied = [o for o in outcomes if o is not None]
            assert [(o.level, o.action) for o in applied] == [
                (level, ("reassign", "notify")[level])
            ]
            assert _level(query, task_id) == level + 1
        task = await _task(apps[0], task_id)
    assert task.escalate_at is None
    assert [d["level"] for _, d in _audit(query, "task.escalated", task_id)] == [0, 1]
    assert query(
        "SELECT COUNT(*) FROM task_events WHERE task_id = ? AND kind = 'escalated'", (task_id,)
    ) == [(2,)]


# -- 9. cancelling the run ----------------------------------------------------------------


async def test_cancelling_a_waiting_run_cancels_its_task(app, wait_status, query):
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.reassign(timedelta(hours=1), groups=["managers"]))
    inbox = Inbox(app)
    async with app, app.worker(concurrency=4):
        run_id, task_id = await _start(app, wait_status, users=["bob"], due_ms=60_000)
        await inbox.claim(task_id, BOB)
        assert (await _task(app, task_id)).escalate_at is not None

        assert await app.cancel(run_id, "no longer needed") is RunStatus.CANCELLED
        run = await app.get_run(run_id)
        task = await _task(app, task_id)
        assert run.status is RunStatus.CANCELLED
        assert task.status is TaskStatus.CANCELLED
        assert task.escalate_at is None  # no escalation will fire for it
        assert task.completed_by is None and task.result is None
        assert _audit(query, "task.cancelled", task_id) == [("system", {"run_id": run_id})]
        assert (await inbox.tasks(BOB, status=["open", "claimed"])).items == []
        with pytest.raises(errors.InvalidState):
            await inbox.complete(task_id, BOB, YES)
        with pytest.raises(errors.InvalidState):
            await inbox.claim(task_id, BOB)
        with pytest.raises(errors.InvalidState):
            await inbox.save_draft(task_id, BOB, {})
        with pytest.raises(errors.InvalidState):
            await inbox.unclaim(task_id, BOB)
        assert (await app.get_run(run_id)).status is RunStatus.CANCELLED
    assert calls["record"] == 0


async def test_an_escalation_never_hands_a_four_eyes_task_to_who_requested_it(
    app, wait_status, wait_until, query
):
    calls: Counter[str] = Counter()
    _register(app, calls, Escalation.reassign(to_manager=True))
    ids = Identity(app)
    async with app, app.worker(concurrency=4):
        await ids.create_user("alice", roles=["approver"])
        mia = (await ids.create_user("mia", roles=["approver"])).person()
        await ids.create_user("bob", roles=["approver"], manager="alice")  # alice: requester
        await ids.create_user("carol", roles=["approver"], manager="mia")
        run_id, task_id = await _start(
            app, wait_status, users=["bob", "carol"], due_ms=30, four_eyes=True
        )
        await wait_until(lambda: _level(query, task_id) == 1, what="escalated")
        task = await _task(app, task_id)
        assert task.users == ["mia"] and task.initiator == "alice"
        [(_, escalated)] = _audit(query, "task.escalated", task_id)
        assert escalated["to"] == ["mia"]
        assert "alice requested the work and may not decide it" in escalated["reason"]
        await Inbox(app).complete(task_id, mia, YES)
        assert (await app.result(run_id, timeout=15))["approved"] is True
