"""The audit chain: one record per transition, appended in the transition's own
transaction; hashes that are domain-separated; `AuditLog.verify` naming the first record a
direct database edit touched; signed checkpoints; concurrent appends; retention.

Tampering is done the way an attacker with database access would do it: plain SQL on a
connection of its own (the ``execute`` fixture), never through flowdesk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import flowdesk
from flowdesk import errors
from flowdesk.engine.tasks import Assignees
from flowdesk.governance import retention
from flowdesk.governance.audit import AuditLog, Report, key_id
from flowdesk.governance.identity import Identity
from flowdesk.humans.inbox import Inbox
from flowdesk.store import audit as records
from flowdesk.store.base import Fenced, StepRow

DAY_MS = 24 * 3600 * 1000


def _canonical(value: Any) -> bytes:
    """The documented canonical JSON, written out here rather than borrowed from the code
    under test: keys sorted, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Approval(BaseModel):
    ok: bool
    note: str = ""


def _register(app: flowdesk.App) -> None:
    @app.step
    def double(x: int) -> int:
        return 2 * x

    @app.step
    def inc(x: int) -> int:
        return x + 1

    @app.workflow("flow")
    async def flow(ctx: flowdesk.Context, n: int) -> dict[str, Any]:
        a = await ctx.step(double, n)
        go = await ctx.wait_signal("go")
        answer = await ctx.human_task(
            "approve",
            title=f"Approve {n}?",
            form=Approval,
            context={"a": a, "secret": f"context-{n}"},
            candidates=Assignees(users=["bob"]),
        )
        return {"a": a, "go": go, "ok": answer.ok}

    @app.workflow("five")
    async def five(ctx: flowdesk.Context, n: int) -> int:
        for _ in range(5):
            n = await ctx.step(inc, n)
        return n

    @app.workflow("quick")
    async def quick(ctx: flowdesk.Context, n: int) -> int:
        return await ctx.step(double, n)


def _log(app: flowdesk.App, tmp_path: Path, **kwargs: Any) -> AuditLog:
    # An explicit key file: on PostgreSQL the default would be ./flowdesk-audit.key.
    return AuditLog(app, tmp_path / "audit.key", **kwargs)


async def _records(app: flowdesk.App) -> list[dict[str, Any]]:
    log = AuditLog(app, "unused.key")
    return [r async for r in log.rows()]


async def _append(app: flowdesk.App, count: int, *, per_tx: int = 2, start: int = 0) -> None:
    """``count`` records through the store's own append path (`SqlTx.seal_audit`),
    ``per_tx`` to a transaction."""
    for first in range(start, start + count, per_tx):
        last = min(first + per_tx, start + count)

        async def op(tx: Any, first: int = first, last: int = last) -> None:
            for i in range(first, last):
                tx.audit("test.event", f"thing:{i}", {"i": i, "text": f"value {i}"})

        await app.submit(op)


async def _wait_task(app: flowdesk.App, run_id: str, wait_until: Any) -> str:
    inbox = Inbox(app)

    async def found() -> str | None:
        page = await inbox.tasks(run_id=run_id, status=["open", "claimed"])
        return page.items[0].id if page.items else None

    task_id: str = await wait_until(found, what=f"a task of run {run_id}")
    return task_id


async def _finish_flow(
    app: flowdesk.App, run_id: str, wait_status: Any, wait_until: Any, *, note: str = ""
) -> None:
    """Drive one run of ``flow`` to its end: signal, then bob claims and completes."""
    await wait_status(app, run_id, "waiting")
    await app.signal(run_id, "go", {"payload": f"go-{run_id}"})
    task_id = await _wait_task(app, run_id, wait_until)
    bob = (await Identity(app).get_user("bob")).person()
    inbox = Inbox(app)
    await inbox.claim(task_id, bob)
    await inbox.complete(task_id, bob, {"ok": True, "note": note})
    await wait_status(app, run_id, "succeeded")


def _kinds(report: Report) -> list[tuple[int, str]]:
    return [(p.seq, p.kind) for p in report.problems]


# -- one record per transition, in its transaction -------------------------------------
async def test_every_transition_appends_its_record_in_order(
    app, tmp_path, query, wait_status, wait_until
):
    _register(app)
    ident = Identity(app)
    async with app:
        await ident.create_user("bob", roles=["viewer"])
        await ident.update_user("bob", roles=["approver"])
        token, _ = await ident.create_token("bob", name="ci")
        handle = await app.start("flow", {"n": 2})
        async with app.worker(concurrency=5):
            await _finish_flow(app, handle.id, wait_status, wait_until)
        rows = await _records(app)
        report = await _log(app, tmp_path).verify()

    run, task = "run:" + handle.id, f"task:{handle.id}-t3"
    assert [(r["action"], r["subject"]) for r in rows] == [
        ("user.created", "user:bob"),
        ("user.roles_changed", "user:bob"),
        ("token.created", "user:bob"),
        ("run.started", run),
        ("step.recorded", run),  # double
        ("step.waiting", run),  # wait_signal("go")
        ("signal.sent", run),
        ("step.recorded", run),  # the signal, consumed
        ("task.created", task),
        ("step.waiting", run),  # the human task
        ("task.claimed", task),
        ("task.completed", task),
        ("step.recorded", run),  # the task's result
        ("run.finished", run),
    ]
    assert [r["seq"] for r in rows] == list(range(1, 15))
    by_action = {r["action"]: r for r in rows}
    assert by_action["user.roles_changed"]["data"] == {"from": ["viewer"], "to": ["approver"]}
    assert by_action["token.created"]["data"]["token_id"] == token.id
    assert by_action["run.finished"]["data"]["status"] == "succeeded"
    assert by_action["task.completed"]["data"]["by"] == "bob"
    # The chain holds digests of payloads, never the payloads themselves.
    assert "context-2" not in json.dumps(rows)
    assert report.ok and report.records == report.head_seq == 14

    # Same transaction, same clock: each record's time is the time its change was written.
    def at(action: str) -> int:
        return int(by_action[action]["at"])

    assert query("SELECT created_at FROM users WHERE id = 'bob'")[0][0] == at("user.created")
    assert query("SELECT updated_at FROM users WHERE id = 'bob'")[0][0] == at("user.roles_changed")
    assert query("SELECT created_at FROM tokens WHERE id = ?", (token.id,))[0][0] == at(
        "token.created"
    )
    assert query("SELECT created_at FROM tasks")[0][0] == at("task.created")
    assert query("SELECT completed_at FROM tasks")[0][0] == at("task.completed")
    assert query("SELECT finished_at FROM runs WHERE id = ?", (handle.id,))[0][0] == at(
        "run.finished"
    )


async def test_a_change_and_its_record_commit_together_or_not_at_all(app, query):
    async with app:

        async def create_then_fail(tx: Any) -> None:
            await tx.create_user("carol", "Carol", ["viewer"], [], None)
            raise RuntimeError("the rest of the operation failed")

        with pytest.raises(RuntimeError):
            await app.submit(create_then_fail)
        assert query("SELECT COUNT(*) FROM users")[0][0] == 0
        assert query("SELECT COUNT(*) FROM audit")[0][0] == 0
        assert await app.store.audit_head() == (0, records.GENESIS)

        await Identity(app).create_user("carol")
        assert [(r["action"], r["subject"]) for r in await _records(app)] == [
            ("user.created", "user:carol")
        ]


async def test_refused_operations_append_nothing(app, tmp_path, wait_status):
    _register(app)
    async with app:
        async with app.worker(concurrency=5):
            done = await app.start("quick", {"n": 1})
            await wait_status(app, done.id, "succeeded")
            waiting = await app.start("flow", {"n": 1})
            await wait_status(app, waiting.id, "waiting")
        before = await _records(app)

        # A signal to a finished run is refused, and leaves no record.
        with pytest.raises(errors.InvalidState):
            await app.signal(done.id, "go", 1)
        # A write by someone who does not hold the run's lease is fenced off.
        row = StepRow(9, "intruder", "step", "ok", "1", None, 1, 0, 0)
        with pytest.raises(Fenced):
            await app.submit(lambda tx: tx.record(waiting.id, "not-the-owner", [row], {}))
        with pytest.raises(errors.Conflict):
            await Identity(app).create_user("dup")  # the first one succeeds...
            await Identity(app).create_user("dup")  # ...the second is refused
        assert [r["action"] for r in await _records(app)] == [
            *(r["action"] for r in before),
            "user.created",
        ]

        # Refused and accepted operations in one group commit: the refused one's records
        # are rolled back with its savepoint, the others' are kept.
        results = await asyncio.gather(
            app.signal(waiting.id, "other", 1),
            app.signal(done.id, "go", 2),
            app.signal(waiting.id, "another", 3),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["NoneType", "InvalidState", "NoneType"]
        after = await _records(app)
        added = after[len(before) + 1 :]
        assert [(r["action"], r["subject"]) for r in added] == [
            ("signal.sent", "run:" + waiting.id),
            ("signal.sent", "run:" + waiting.id),
        ]
        assert [r["seq"] for r in after] == list(range(1, len(after) + 1))
        assert (await _log(app, tmp_path).verify()).ok


async def test_records_name_the_acting_user(app, wait_status):
    _register(app)
    async with app:
        token = records.ACTOR.set("alice")
        try:
            await Identity(app).create_user("bob", roles=["approver"])
            handle = await app.start("quick", {"n": 3})
        finally:
            records.ACTOR.reset(token)
        await Identity(app).create_user("dave")  # nobody set: the system acts
        async with app.worker():
            await wait_status(app, handle.id, "succeeded")
        rows = await _records(app)

    actors = [(r["actor"], r["action"]) for r in rows]
    assert actors[:3] == [
        ("alice", "user.created"),
        ("alice", "run.started"),
        ("system", "user.created"),
    ]
    started = next(r for r in rows if r["action"] == "run.started")
    assert started["data"]["initiator"] == "alice"
    # The worker acts for the system, not for whoever started the run.
    assert {a for a, action in actors if action in ("step.recorded", "run.finished")} == {"system"}


# -- the record format ------------------------------------------------------------------
async def test_record_hashes_are_domain_separated_and_chained(app, tmp_path):
    async with app:
        await Identity(app).create_user("bob", roles=["approver"], groups=["finanças"])
        await _append(app, 5)
        log = _log(app, tmp_path)
        checkpoint = await log.checkpoint()
        rows = await _records(app)

    prev = records.GENESIS
    for r in rows:
        assert r["prev_hash"] == prev
        data_text = _canonical(r["data"])
        assert r["data_hash"] == hashlib.sha256(data_text).hexdigest()
        body = _canonical(
            {k: r[k] for k in ("seq", "at", "actor", "action", "subject", "data_hash", "prev_hash")}
        )
        assert r["hash"] == hashlib.sha256(b"\x00" + body).hexdigest()
        # Without the 0x00 leaf prefix the same bytes hash to something else.
        assert r["hash"] != hashlib.sha256(body).hexdigest()
        assert r["hash"] != hashlib.sha256(b"\x01" + body).hexdigest()
        prev = r["hash"]

    assert checkpoint is not None and checkpoint.seq == 6 and checkpoint.hash == prev
    message = records.checkpoint_message(checkpoint.seq, checkpoint.hash, checkpoint.at)
    assert message[:1] == b"\x01"
    assert message[1:] == _canonical(
        {"seq": checkpoint.seq, "hash": checkpoint.hash, "at": checkpoint.at}
    )
    public = log.signing_key().public_key()
    public.verify(bytes.fromhex(checkpoint.signature), message)  # raises when it is wrong
    assert checkpoint.key_id == key_id(public)


# -- verification: every kind of direct tampering -----------------------------------------
async def test_verify_passes_on_an_intact_chain(app, tmp_path):
    async with app:
        assert (await _log(app, tmp_path).verify()).as_dict()["ok"] is True  # empty chain
        await _append(app, 12)
        log = _log(app, tmp_path)
        await log.checkpoint()
        await _append(app, 3, start=12)
        report = await log.verify()
    assert report.ok and report.first_bad_seq is None
    assert (report.records, report.head_seq, report.checkpoints) == (15, 15, 1)
    assert report.last_checkpoint == 12 and report.unanchored == 3


async def test_edited_data_is_reported_at_its_seq(app, tmp_path, execute):
    async with app:
        await _append(app, 10)
        execute("UPDATE audit SET data = ? WHERE seq = 6", ('{"i":5,"text":"forged"}',))
        report = await _log(app, tmp_path).verify()
    assert report.first_bad_seq == 6
    assert _kinds(report) == [(6, "data_altered")]
    assert "data does not match data_hash" in report.problems[0].message


async def test_edited_data_with_its_data_hash_is_reported_as_an_altered_record(
    app, tmp_path, execute
):
    forged = records.canonical({"i": 4, "text": "forged"}).decode()
    async with app:
        await _append(app, 10)
        execute(
            "UPDATE audit SET data = ?, data_hash = ? WHERE seq = 5",
            (forged, hashlib.sha256(forged.encode()).hexdigest()),
        )
        report = await _log(app, tmp_path).verify()
    assert report.first_bad_seq == 5
    assert _kinds(report) == [(5, "record_altered")]


async def test_a_deleted_record_is_reported_missing_at_its_seq(app, tmp_path, execute):
    async with app:
        await _append(app, 10)
        assert execute("DELETE FROM audit WHERE seq = 4") == 1
        report = await _log(app, tmp_path).verify()
    assert report.first_bad_seq == 4
    assert _kinds(report)[0] == (4, "missing")
    assert (5, "broken_link") in _kinds(report)  # record 5 names a hash no one has now
    assert report.records == 9


async def test_two_swapped_records_are_reported_at_the_lower_seq(app, tmp_path, execute):
    async with app:
        await _append(app, 10)
        execute("UPDATE audit SET seq = -1 WHERE seq = 7")
        execute("UPDATE audit SET seq = 7 WHERE seq = 8")
        execute("UPDATE audit SET seq = 8 WHERE seq = -1")
        report = await _log(app, tmp_path).verify()
    assert report.first_bad_seq == 7
    assert {kind for seq, kind in _kinds(report) if seq == 7} == {"broken_link", "record_altered"}
    # ...and record 9, whose prev_hash names the record that is no longer before it.
    assert {seq for seq, _ in _kinds(report)} == {7, 8, 9}


async def test_a_tail_cut_after_the_last_checkpoint_is_caught_by_the_head_row(
    app, tmp_path, execute
):
    async with app:
        await _append(app, 12)
        log = _log(app, tmp_path)
        await log.checkpoint()
        await _append(app, 8, start=12)
        assert execute("DELETE FROM audit WHERE seq > 17") == 3
        report = await log.verify()
    assert report.first_bad_seq == 18
    assert _kinds(report) == [(18, "truncated")]
    assert "head row" in report.problems[0].message
    assert report.last_checkpoint == 12  # the checkpoint itself still holds


async def test_a_cut_below_a_checkpoint_is_caught_even_when_the_head_row_is_fixed(
    app, tmp_path, execute, query
):
    async with app:
        await _append(app, 12)
        log = _log(app, tmp_path)
        await log.checkpoint()
        await _append(app, 4, start=12)
        execute("DELETE FROM audit WHERE seq > 9")
        (last_hash,) = query("SELECT hash FROM audit WHERE seq = 9")[0]
        execute("UPDATE audit_head SET seq = 9, hash = ? WHERE id = 1", (last_hash,))
        report = await log.verify()
    assert report.first_bad_seq == 10
    assert _kinds(report) == [(10, "truncated")]
    assert "signed checkpoint covers record 12" in report.problems[0].message


async def test_a_chain_rewritten_behind_a_checkpoint_is_caught_by_the_checkpoint(
    app, tmp_path, execute, query
):
    """Whoever can write the database can recompute every hash after an edit and fix the
    head row: the chain is then consistent, and only the signed checkpoint disagrees."""
    async with app:
        await _append(app, 10)
        log = _log(app, tmp_path)
        await log.checkpoint()
        rows = query(
            "SELECT seq, at, actor, action, subject, data, data_hash, prev_hash, hash"
            " FROM audit ORDER BY seq"
        )
        prev = records.GENESIS
        for seq, at, actor, action, subject, data, data_hash, _, _ in rows:
            if seq == 3:
                data = records.canonical({"i": 2, "text": "rewritten"}).decode()
                data_hash = hashlib.sha256(data.encode()).hexdigest()
            new_hash = records.record_hash(seq, at, actor, action, subject, data_hash, prev)
            execute(
                "UPDATE audit SET data = ?, data_hash = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (data, data_hash, prev, new_hash, seq),
            )
            prev = new_hash
        execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
        report = await log.verify()
    assert _kinds(report) == [(10, "checkpoint")]
    assert "differs from the signed checkpoint" in report.problems[0].message


async def test_forged_checkpoints_are_reported(app, tmp_path, execute, query):
    async with app:
        await _append(app, 6)
        log = _log(app, tmp_path)
        cp = await log.checkpoint()
        assert cp is not None and cp.seq == 6
        await _append(app, 4, start=6)
        head_seq, head_hash = await app.store.audit_head()

        # 1. A signature that is not the key's.
        execute("UPDATE audit_checkpoints SET signature = ? WHERE seq = 6", ("ab" * 64,))
        # 2. A checkpoint signed with another key (and saying so).
        other = Ed25519PrivateKey.generate()
        ((hash8,),) = query("SELECT hash FROM audit WHERE seq = 8")
        message = records.checkpoint_message(8, hash8, 1)
        execute(
            "INSERT INTO audit_checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)",
            (8, hash8, 1, key_id(other.public_key()), other.sign(message).hex()),
        )
        # 3. Signed with another key but labelled with ours.
        message = records.checkpoint_message(head_seq, head_hash, 2)
        execute(
            "INSERT INTO audit_checkpoints (seq, hash, at, key_id, signature) VALUES (?,?,?,?,?)",
            (head_seq, head_hash, 2, cp.key_id, other.sign(message).hex()),
        )
        report = await log.verify()
        # Verified with someone else's public key, every checkpoint is unknown.
        foreign = await log.verify(other.public_key())

    assert report.first_bad_seq == 6
    assert _kinds(report) == [(6, "checkpoint"), (8, "checkpoint"), (10, "checkpoint")]
    messages = [p.message for p in report.problems]
    assert "bad signature" in messages[0]
    assert "unknown key" in messages[1]
    assert "bad signature" in messages[2]
    assert report.last_checkpoint == 0
    assert [p.seq for p in foreign.problems if "unknown key" in p.message] == [6, 10]


async def test_verify_without_the_key_file_refuses_and_creates_no_key(app, tmp_path):
    async with app:
        await _append(app, 3)
        await _log(app, tmp_path).checkpoint()
        missing = tmp_path / "elsewhere.key"
        with pytest.raises(errors.ConfigurationError, match="no key file"):
            await AuditLog(app, missing).verify()
        assert not missing.exists()
        # Its public half alone is enough to verify.
        public = tmp_path / "audit.pub"
        public.write_bytes(
            _log(app, tmp_path)
            .signing_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert (await AuditLog(app, public).verify()).ok


# -- checkpoints made by workers -------------------------------------------------------------
async def test_installed_checkpoints_are_signed_by_a_running_worker(
    app, tmp_path, wait_status, wait_until
):
    _register(app)
    key_file = tmp_path / "keys" / "audit.key"
    key_file.parent.mkdir()
    log = AuditLog(app, key_file, every=5).install()
    async with app, app.worker(concurrency=10):
        handles = [await app.start("five", {"n": i}) for i in range(3)]
        for h in handles:
            await wait_status(app, h.id, "succeeded")
        # 3 × (started + 5 steps + finished) = 21 records: a checkpoint every 5 or more.

        async def signed() -> bool:
            # Signed up to the chain's end: fewer than 5 records after the last checkpoint
            # (the worker checkpoints in its upkeep, so it may still be catching up).
            cps = await log.checkpoints()
            head = max(int(r["seq"]) for r in await _records(app))
            return bool(cps) and cps[-1].seq >= 16 and head - cps[-1].seq < 5

        await wait_until(signed, timeout=20, what="checkpoints up to the chain's end")
        cps = await log.checkpoints()
        assert all(b.seq - a.seq >= 5 for a, b in zip(cps, cps[1:], strict=False))
        assert await log.maybe_checkpoint() is None  # fewer than 5 records since the last
        report = await log.verify()
    assert report.ok and report.checkpoints == len(cps) >= 1
    assert report.last_checkpoint == cps[-1].seq
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key_file.read_bytes()


# -- concurrency ------------------------------------------------------------------------------
async def test_concurrent_appends_make_one_gap_free_chain(app, tmp_path, wait_until):
    _register(app)
    async with app, app.worker(concurrency=20):
        handles = await asyncio.gather(*(app.start("five", {"n": i}) for i in range(50)))

        async def all_done() -> bool:
            return await app.store.count_runs("succeeded") == 50

        await wait_until(all_done, timeout=60, what="50 runs to succeed")
        rows = await _records(app)
        report = await _log(app, tmp_path).verify()

    assert len(rows) == 50 * 7
    assert [r["seq"] for r in rows] == list(range(1, 351))
    assert len({r["hash"] for r in rows}) == 350  # no fork: every record is distinct
    assert report.ok and report.records == report.head_seq == 350
    for h in handles:
        mine = [r for r in rows if r["subject"] == "run:" + h.id]
        assert [r["action"] for r in mine] == [
            "run.started",
            *["step.recorded"] * 5,
            "run.finished",
        ]
        assert [r["data"]["seq"] for r in mine[1:6]] == [1, 2, 3, 4, 5]


# -- retention --------------------------------------------------------------------------------
async def test_retention_empties_old_finished_runs_and_the_chain_still_verifies(
    app, tmp_path, query, execute, wait_status, wait_until
):
    _register(app)
    async with app:
        await Identity(app).create_user("bob", roles=["approver"])
        async with app.worker(concurrency=10):
            old = [await app.start("flow", {"n": n}) for n in (1, 2)]
            for h in old:
                await _finish_flow(app, h.id, wait_status, wait_until, note="private")
            recent = await app.start("flow", {"n": 3})
            await _finish_flow(app, recent.id, wait_status, wait_until, note="private")
            unfinished = await app.start("flow", {"n": 4})
            await wait_status(app, unfinished.id, "waiting")
            await app.signal(unfinished.id, "go", {"payload": "kept"})
            await _wait_task(app, unfinished.id, wait_until)
        # Two runs finished 40 days ago; the unfinished one was created that long ago.
        for h in old:
            execute(
                "UPDATE runs SET finished_at = finished_at - ? WHERE id = ?", (40 * DAY_MS, h.id)
            )
        execute(
            "UPDATE runs SET created_at = created_at - ? WHERE id = ?",
            (40 * DAY_MS, unfinished.id),
        )
        head_before, _ = await app.store.audit_head()

        purged = await retention.purge(app, older_than=timedelta(days=30))
        again = await retention.purge(app, older_than=timedelta(days=30))
        rows = await _records(app)
        report = await _log(app, tmp_path).verify()
        # Payloads are sealed at rest: read the kept ones through the store.
        kept_inputs = {k: (await app.get_run(k)).input for k in (recent.id, unfinished.id)}
        kept_contexts = {}
        for k in (recent.id, unfinished.id):
            ((task_id,),) = query("SELECT id FROM tasks WHERE run_id = ?", (k,))
            kept_contexts[k] = (await app.store.get_task(task_id)).context

    assert sorted(purged) == sorted(h.id for h in old)
    assert again == []
    old_ids = [h.id for h in old]
    for run_id in old_ids:
        ((inp, out, purged_at),) = query(
            "SELECT input, output, purged_at FROM runs WHERE id = ?", (run_id,)
        )
        assert (inp, out) == ("null", None) and purged_at is not None
        assert query("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0] == "succeeded"
        assert {o for (o,) in query("SELECT output FROM steps WHERE run_id = ?", (run_id,))} == {
            None
        }
        # "go", and the signal completing the task sent: both emptied
        assert query("SELECT payload FROM signals WHERE run_id = ?", (run_id,)) == [(None,)] * 2
        assert query("SELECT context, result, draft FROM tasks WHERE run_id = ?", (run_id,)) == [
            (None, None, None)
        ]
    for kept in (recent.id, unfinished.id):
        ((purged_at,),) = query("SELECT purged_at FROM runs WHERE id = ?", (kept,))
        assert kept_inputs[kept]["n"] in (3, 4) and purged_at is None
        signals = query("SELECT payload FROM signals WHERE run_id = ?", (kept,))
        assert signals and all(p is not None for (p,) in signals)
        assert kept_contexts[kept] is not None and "context-" in json.dumps(kept_contexts[kept])
        assert all(
            o is not None
            for (o,) in query(
                "SELECT output FROM steps WHERE run_id = ? AND status = 'ok'", (kept,)
            )
        )
    assert query("SELECT result FROM tasks WHERE run_id = ?", (recent.id,))[0][0] is not None

    # One record for the purge (none for the empty second one), by the retention actor.
    assert len(rows) == head_before + 1
    last = rows[-1]
    assert (last["action"], last["subject"], last["actor"]) == (
        "retention.purged",
        "runs",
        "system:retention",
    )
    assert sorted(last["data"]["runs"]) == sorted(old_ids)
    assert report.ok and report.records == head_before + 1


async def test_retention_needs_a_positive_age(app):
    async with app:
        with pytest.raises(errors.ConfigurationError):
            await retention.purge(app, older_than=timedelta(0))


# -- property: the first bad seq is where the tampering happened --------------------------
@pytest.mark.sqlite_only
@settings(
    max_examples=25,
    deadline=None,
    # Each example makes a database of its own (new_db_url); the fixtures are only factories.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=8),
    tamper=st.sampled_from(["edit_data", "edit_field", "delete", "swap"]),
    where=st.integers(min_value=0, max_value=10_000),
    payload=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none()),
        max_size=3,
    ),
)
async def test_first_bad_seq_is_the_tampered_record(
    store_kind: str,
    new_db_url: Callable[..., str],
    tmp_path: Path,
    sizes: list[int],
    tamper: str,
    where: int,
    payload: dict[str, Any],
) -> None:
    assert store_kind == "sqlite"
    url = new_db_url()
    app = flowdesk.App(url)
    async with app:
        for n, size in enumerate(sizes):

            async def op(tx: Any, n: int = n, size: int = size) -> None:
                for i in range(size):
                    tx.audit("prop.event", f"thing:{n}.{i}", {**payload, "n": n, "i": i})

            await app.submit(op)
    total = sum(sizes)
    if tamper == "swap" and total < 2:
        tamper = "edit_data"
    pos = 1 + where % (total - 1 if tamper == "swap" else total)

    conn = sqlite3.connect(url[len("sqlite:///") :])
    try:
        if tamper == "edit_data":
            conn.execute("UPDATE audit SET data = data || ' ' WHERE seq = ?", (pos,))
        elif tamper == "edit_field":
            conn.execute("UPDATE audit SET actor = 'mallory' WHERE seq = ?", (pos,))
        elif tamper == "delete":
            conn.execute("DELETE FROM audit WHERE seq = ?", (pos,))
        else:
            conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (pos,))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (pos, pos + 1))
            conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (pos + 1,))
        conn.commit()
    finally:
        conn.close()

    app = flowdesk.App(url)
    async with app:
        report = await AuditLog(app, tmp_path / "prop.key").verify()
    assert report.first_bad_seq == pos, (tamper, pos, total, report.as_dict())
    assert not report.ok
