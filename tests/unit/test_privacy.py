"""Payload encryption at rest, data subjects, erasure by key destruction (both stores).

The must-show: a unique e-mail address, IBAN and name planted in a run's input, a step
result, a signal, a task draft and a task form never reach the database in the clear (the
SQLite file and its WAL; a ``pg_dump`` of the PostgreSQL database), nor the logs, nor
``/metrics``; erasing the data subject leaves the runs listed with their metadata, every
payload erased, the waiting run cancelled with a clear reason, and the audit verifying.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.engine import schedules
from flowdesk.engine.tasks import Assignees
from flowdesk.governance import audit as audit_log
from flowdesk.governance import privacy, retention
from flowdesk.governance.audit import AuditLog
from flowdesk.governance.identity import Identity
from flowdesk.humans.inbox import Inbox
from flowdesk.server import app as server
from flowdesk.store.people import Person

BOB = Person("bob")


class Review(BaseModel):
    approved: bool
    note: str = ""


def _secrets() -> dict[str, str]:
    tag = secrets.token_hex(4)
    digits = "".join(str(int(c, 16) % 10) for c in secrets.token_hex(5))
    return {
        "email": f"jane.{tag}@example.org",
        "iban": f"DE89370400{digits}1234",
        "name": f"Jane Quokka{tag}",
    }


def _register(app: flowdesk.App) -> None:
    @app.step(name="lookup")
    async def lookup(email: str) -> dict[str, str]:
        # The step result carries the IBAN and the name (looked up from the e-mail).
        return {"email": email, "holder": holder[email], "iban": iban[email]}

    holder: dict[str, str] = {}
    iban: dict[str, str] = {}

    @app.workflow("kyc")
    async def kyc(ctx: flowdesk.Context, email: str, name: str, iban_: str) -> dict[str, Any]:
        holder[email], iban[email] = name, iban_
        found = await ctx.step(lookup, email)
        confirmed = await ctx.wait_signal("confirmed")
        review = await ctx.human_task(
            "review",
            title="Check the account holder",  # metadata: no personal data here
            form=Review,
            context={"holder": found["holder"], "iban": found["iban"]},
            candidates=Assignees(users=["bob"]),
        )
        return {"iban": found["iban"], "confirmed": confirmed, "note": review.note}


async def _task_of(app: flowdesk.App, run_id: str, wait_until: Any) -> str:
    async def find() -> str | None:
        page = await Inbox(app).tasks(BOB)
        ids = [t.id for t in page.items if t.run_id == run_id and t.status.active]
        return ids[0] if ids else None

    found: str = await wait_until(find, what=f"a task of run {run_id}")
    return found


async def _drive(
    app: flowdesk.App, planted: dict[str, str], wait_status: Any, wait_until: Any, **kw: Any
) -> flowdesk.RunHandle:
    h = await app.start(
        "kyc",
        {"email": planted["email"], "name": planted["name"], "iban_": planted["iban"]},
        **kw,
    )
    await wait_status(app, h.id, RunStatus.WAITING)
    await app.signal(h.id, "confirmed", {"by": planted["email"], "holder": planted["name"]})
    task_id = await _task_of(app, h.id, wait_until)
    note = f"called {planted['name']} at {planted['email']} about {planted['iban']}"
    await Inbox(app).save_draft(task_id, BOB, {"approved": False, "note": "draft: " + note})
    await Inbox(app).complete(task_id, BOB, {"approved": True, "note": note})
    return h


def _pg_dump(url: str) -> bytes:
    exe = shutil.which("pg_dump") or next(
        iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_dump"), reverse=True)), None
    )
    assert exe, "pg_dump is needed (apt-get install postgresql-client)"
    done = subprocess.run(
        [str(exe), "--data-only", "--no-owner", "--dbname", url],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def _raw_database(store_kind: str, db_url: str, db_path: Path | None) -> bytes:
    if store_kind == "sqlite":
        assert db_path is not None
        files = [db_path, Path(str(db_path) + "-wal")]
        assert files[1].exists(), "the test reads the WAL too: it should exist (WAL mode)"
        return b"".join(f.read_bytes() for f in files)
    return _pg_dump(db_url)


def _forms(planted: dict[str, str]) -> list[bytes]:
    """Each planted value as it could appear: UTF-8, and JSON-escaped (same here)."""
    return [v.encode() for v in planted.values()]


async def test_no_personal_data_at_rest_in_logs_or_metrics(
    store_kind, db_url, request, app, tmp_path, wait_status, wait_until, caplog
):
    caplog.set_level(logging.DEBUG)
    planted = _secrets()
    _register(app)
    api_app = server.create_app(app, audit=AuditLog(app, tmp_path / "audit.key"))
    transport = httpx.ASGITransport(app=api_app)
    async with (
        app,
        httpx.AsyncClient(transport=transport, base_url="http://flowdesk.test") as client,
        app.worker(),
    ):
        await Identity(app).create_user("bob", roles=["approver"])
        h = await _drive(app, planted, wait_status, wait_until)
        out = await h.result(timeout=15)
        metrics = (await client.get("/metrics")).text
        # The engine itself reads everything back (the key is in memory and in the file).
        assert out["iban"] == planted["iban"] and planted["email"] in out["note"]
        run = await app.get_run(h.id)
        assert run.input["email"] == planted["email"]
        steps = {s.name: s for s in await app.steps(h.id)}
        assert steps["lookup"].output["holder"] == planted["name"]
        assert (await app.store.signals_of(h.id))[0]["payload"]["by"] == planted["email"]
        # Read while the store is open, so the SQLite WAL is still there (closing
        # checkpoints it into the file and removes it); the file is read as it is too.
        db_path = request.getfixturevalue("db_path") if store_kind == "sqlite" else None
        raw = _raw_database(store_kind, db_url, db_path)
    if db_path is not None:
        raw += db_path.read_bytes()  # after the checkpoint
    assert b"$fd1$rk-" in raw  # sealed payloads are there, under run keys
    assert len(raw) > 10_000
    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for value in _forms(planted):
        assert value not in raw, f"{value!r} is in the database in the clear"
        assert value.decode() not in logs, f"{value!r} is in the logs"
        assert value.decode() not in metrics, f"{value!r} is in /metrics"


async def test_erasure_keeps_metadata_cancels_waiting_runs_and_the_audit_verifies(
    app, tmp_path, wait_status, wait_until, query
):
    planted = _secrets()
    _register(app)
    log = AuditLog(app, tmp_path / "audit.key")
    async with app, app.worker():
        await Identity(app).create_user("bob", roles=["approver"])
        done = await _drive(app, planted, wait_status, wait_until, subjects=["customer:42"])
        await done.result(timeout=15)
        waiting = await app.start(
            "kyc",
            {"email": planted["email"], "name": planted["name"], "iban_": planted["iban"]},
            subjects=["customer:42"],
        )
        other = await app.start(
            "kyc", {"email": "o@example.org", "name": "Other", "iban_": "X"}, subjects=["c:7"]
        )
        await wait_status(app, waiting.id, RunStatus.WAITING)
        await wait_status(app, other.id, RunStatus.WAITING)
        await log.checkpoint()
        assert (await log.verify()).ok

        erased = await privacy.erase(app, "customer:42", reason="request 17", actor="alice")
        assert sorted(erased["runs"]) == sorted([done.id, waiting.id])
        assert erased["cancelled"] == [waiting.id]

        # The runs still list, with their metadata; every payload reads as erased.
        listed = {r.id: r for r in (await app.list_runs(workflow="kyc")).items}
        assert listed[done.id].status is RunStatus.SUCCEEDED
        assert privacy.is_erased(listed[done.id].input)
        assert privacy.is_erased(listed[done.id].output)
        steps = await app.steps(done.id)
        assert [s.name for s in steps][:2] == ["lookup", "signal:confirmed"]
        assert all(privacy.is_erased(s.output) for s in steps if s.output is not None)
        task = (await Inbox(app).tasks(Person("olga", privileged=True), status=["completed"])).items
        assert task and all(privacy.is_erased(t.result) for t in task if t.run_id == done.id)

        # The waiting run was cancelled with a clear reason, never resumed.
        gone = await wait_status(app, waiting.id, RunStatus.CANCELLED)
        assert gone.error["type"] == "PayloadsErased"
        assert "customer:42 was erased" in gone.error["message"]
        assert privacy.is_erased(gone.input)
        with pytest.raises(errors.InvalidState):
            await app.signal(waiting.id, "confirmed", {"x": 1})

        # Another subject's run is untouched and finishes.
        assert (await app.get_run(other.id)).input["email"] == "o@example.org"
        await app.signal(other.id, "confirmed", True)
        task_id = await _task_of(app, other.id, wait_until)
        await Inbox(app).complete(task_id, BOB, {"approved": True})
        assert (await app.result(other.id, timeout=15))["iban"] == "X"

        # The chain still verifies, and it recorded the erasure.
        report = await log.verify()
        assert report.ok, report.problems
        rows = [r async for r in log.rows(subject="subject:customer:42")]
        assert [(r["action"], r["actor"]) for r in rows] == [("subject.erased", "alice")]
        assert rows[0]["data"]["reason"] == "request 17"

        # The subject may come back: a new run gets a new subject key.
        again = await app.start(
            "kyc", {"email": "e@x.org", "name": "N", "iban_": "I"}, subjects=["customer:42"]
        )
        assert (await app.get_run(again.id)).input["email"] == "e@x.org"
    keys = query(
        "SELECT kind, wrapped IS NULL, destroyed_reason FROM data_keys WHERE owner = ?",
        ("customer:42",),
    )
    assert sorted(k[1] for k in keys) == [False, True]
    assert any("customer:42 was erased (request 17)" in (k[2] or "") for k in keys)


async def test_subjects_added_mid_run_and_a_subject_access_export(app, wait_status, wait_until):
    @app.step(name="enrich")
    async def enrich(customer: str) -> dict[str, str]:
        return {"customer": customer, "phone": "+49 30 1234567"}

    @app.workflow("support")
    async def support(ctx: flowdesk.Context, customer: str) -> str:
        await ctx.add_subject("customer:" + customer)
        info = await ctx.step(enrich, customer)
        await ctx.add_subject("customer:" + customer)  # twice: nothing changes
        answer = await ctx.wait_signal("answer")
        return f"{info['phone']} {answer}"

    async with app, app.worker():
        h = await app.start("support", {"customer": "42"})
        plain = await app.start("support", {"customer": "43"})
        await wait_status(app, h.id, RunStatus.WAITING)
        await app.signal(h.id, "answer", "call back at 5")
        assert await h.result(timeout=15) == "+49 30 1234567 call back at 5"
        assert await app.store.run_subjects(h.id) == ["customer:42"]

        export = await privacy.export(app, "customer:42")
        assert [r["id"] for r in export["runs"]] == [h.id]
        (run,) = export["runs"]
        assert run["input"] == {"customer": "42"} and not run["erased"]
        assert {s["name"]: s["output"] for s in run["steps"]}["enrich"]["phone"] == "+49 30 1234567"
        assert run["signals"][0]["payload"] == "call back at 5"

        await privacy.erase(app, "customer:42")
        after = await privacy.export(app, "customer:42")
        assert after["runs"][0]["erased"] and privacy.is_erased(after["runs"][0]["output"])
        # The other customer's run was never tied to 42 and is still readable.
        await wait_status(app, plain.id, RunStatus.WAITING)
        assert (await app.get_run(plain.id)).input == {"customer": "43"}
        with pytest.raises(errors.ConfigurationError):
            await app.start("support", {"customer": "1"}, subjects="customer:1")  # type: ignore[arg-type]


async def test_a_flipped_byte_or_a_moved_ciphertext_is_reported_as_tampering(app, query, execute):
    @app.step(name="one")
    async def one(n: int) -> dict[str, int]:
        return {"n": n}

    @app.workflow("two_steps")
    async def two_steps(ctx: flowdesk.Context, n: int) -> int:
        a = await ctx.step(one, n)
        b = await ctx.step(one, n + 1)
        return a["n"] + b["n"]

    async with app, app.worker():
        h = await app.start("two_steps", {"n": 1})
        assert await h.result(timeout=15) == 3
    ((first, key_id),) = query(
        "SELECT s.output, k.id FROM steps s JOIN data_keys k ON k.owner = s.run_id"
        " WHERE s.run_id = ? AND s.seq = 1",
        (h.id,),
    )
    assert first.startswith(f"$fd1${key_id}$")
    # Moved: step 1's ciphertext copied over step 2's.
    execute("UPDATE steps SET output = ? WHERE run_id = ? AND seq = 2", (first, h.id))
    async with app:
        with pytest.raises(errors.PayloadTampered) as moved:
            await app.steps(h.id)
        assert key_id in str(moved.value) and "seq 2" in str(moved.value)
    # Flipped: one byte of the ciphertext changed.
    body = first[-10:]
    flipped = first[:-10] + ("A" if body[0] != "A" else "B") + body[1:]
    execute("UPDATE steps SET output = ? WHERE run_id = ? AND seq = 1", (flipped, h.id))
    async with app:
        with pytest.raises(errors.PayloadTampered, match="Tampering detected"):
            await app.steps(h.id)


async def test_rotation_rewraps_keys_and_a_missing_key_is_named(
    make_app, tmp_path, monkeypatch, wait_status
):
    key_file = tmp_path / "master.key"
    monkeypatch.setenv("FLOWDESK_MASTER_KEY_FILE", str(key_file))
    app = make_app()

    @app.workflow("echo")
    async def echo(ctx: flowdesk.Context, text: str) -> str:
        return (await ctx.wait_signal("more")) + text

    async with app, app.worker():
        done = await app.start("echo", {"text": "a"}, subjects=["s:1"])
        inflight = await app.start("echo", {"text": "b"})
        await app.signal(done.id, "more", "x")
        assert await done.result(timeout=15) == "xa"
        await wait_status(app, inflight.id, RunStatus.WAITING)
        old_id = app.store.keys.masters.current_id  # type: ignore[attr-defined]
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        rotated = await privacy.rotate(app)
        assert rotated["rewrapped"] >= 2 and rotated["key_id"] != old_id
        assert old_id not in await app.store.key_usage()
        # The in-flight run finishes; the old one still reads.
        await app.signal(inflight.id, "more", "y")
        assert await inflight.result(timeout=15) == "yb"
        assert (await app.get_run(done.id)).output == "xa"
        await privacy.retire(app, old_id)
    assert old_id not in key_file.read_text()

    # Only the new key: everything still opens (a new process, in effect).
    async with make_app():
        pass
    reader = make_app()
    async with reader:
        assert (await reader.get_run(done.id)).input == {"text": "a"}

    # Another key entirely: a clear error naming the key id that is needed.
    monkeypatch.setenv("FLOWDESK_MASTER_KEY", "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=")
    stranger = make_app()
    async with stranger:
        with pytest.raises(errors.MasterKeyMissing) as missing:
            await stranger.get_run(inflight.id)
    assert rotated["key_id"] in str(missing.value)


async def test_retention_policy_destroys_payload_keys_of_old_finished_runs(app, execute, tmp_path):
    @app.workflow("short_lived")
    async def short_lived(ctx: flowdesk.Context, n: int) -> int:
        return n * 2

    async with app:
        async with app.worker():
            old = await app.start("short_lived", {"n": 1})
            new = await app.start("short_lived", {"n": 2})
            assert await old.result(timeout=15) == 2 and await new.result(timeout=15) == 4
        execute(
            "UPDATE runs SET finished_at = finished_at - ? WHERE id = ?", (40 * 86_400_000, old.id)
        )
        await app.submit(lambda tx: tx.set_retention("short_lived", 30 * 86_400_000))
        assert await app.store.retention_policies() == {"short_lived": 30 * 86_400_000}
        expired = await app.submit(lambda tx: tx.expire_payloads(100))
        assert expired == [old.id]
        assert await app.submit(lambda tx: tx.expire_payloads(100)) == []
        gone = await app.get_run(old.id)
        assert gone.status is RunStatus.SUCCEEDED and privacy.is_erased(gone.output)
        assert (await app.get_run(new.id)).output == 4
        rows = [r async for r in audit_log.AuditLog(app, tmp_path / "a.key").rows(subject="runs")]
        assert rows[-1]["action"] == "retention.keys_destroyed"
        assert rows[-1]["data"]["runs"] == [old.id]
        assert (await audit_log.AuditLog(app, tmp_path / "a.key").verify()).ok


async def test_the_durable_expiry_job_destroys_keys_on_its_schedule(
    app, execute, query, wait_until
):
    @app.workflow("brief")
    async def brief(ctx: flowdesk.Context, n: int) -> int:
        return n

    retention.install_policies(app, cron="*/5 * * * *")
    retention.install_policies(app)  # once is enough: the second call changes nothing
    async with app:
        h = await app.start("brief", {"n": 5})
        async with app.worker():
            assert await h.result(timeout=15) == 5
        execute("UPDATE runs SET finished_at = finished_at - ? WHERE id = ?", (3_600_000, h.id))
        await retention.set_policy(app, "brief", timedelta(minutes=30))
        # The job's schedule is stored (as a worker does when it starts) and its next tick
        # made due now, while no transaction runs; a worker then runs it once.
        await schedules.sync(app)
        execute("UPDATE schedules SET next_tick = 0 WHERE name = ?", (retention.EXPIRE_WORKFLOW,))
        async with app.worker():

            async def ticked() -> bool:
                runs = (await app.list_runs(workflow=retention.EXPIRE_WORKFLOW)).items
                return bool(runs) and runs[0].status is RunStatus.SUCCEEDED

            await wait_until(ticked, what="the expiry job ran")
        assert privacy.is_erased((await app.get_run(h.id)).output)
        job = query("SELECT id FROM runs WHERE workflow = ?", (retention.EXPIRE_WORKFLOW,))[0][0]
        assert (await app.get_run(job)).output == 1


def test_the_master_key_file_is_created_once_with_mode_0600(tmp_path, monkeypatch):
    from flowdesk.store import payloads

    monkeypatch.delenv("FLOWDESK_MASTER_KEY_FILE", raising=False)
    monkeypatch.delenv("FLOWDESK_MASTER_KEY", raising=False)
    url = f"sqlite:///{tmp_path}/x.db"
    first = payloads.load_master_keys(url)
    again = payloads.load_master_keys(url)
    path = tmp_path / "x.db.master-key"
    assert first is not None and again is not None and first.raw == again.raw
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setenv("FLOWDESK_PAYLOAD_ENCRYPTION", "off")
    assert payloads.load_master_keys(url) is None
    monkeypatch.setenv("FLOWDESK_PAYLOAD_ENCRYPTION", "on")
    monkeypatch.setenv("FLOWDESK_MASTER_KEY", "c2hvcnQ=")
    with pytest.raises(errors.ConfigurationError, match="32 bytes"):
        payloads.load_master_keys(url)
    assert os.environ.get("FLOWDESK_MASTER_KEY_FILE") is None


async def test_api_masks_payloads_without_payload_read_and_audits_every_reveal(
    app, tmp_path, wait_status, wait_until
):
    planted = _secrets()
    _register(app)
    api_app = server.create_app(app, audit=AuditLog(app, tmp_path / "audit.key"))
    transport = httpx.ASGITransport(app=api_app)
    async with (
        app,
        httpx.AsyncClient(transport=transport, base_url="http://flowdesk.test") as client,
        app.worker(),
    ):
        ids = Identity(app)
        tokens = {}
        for uid, roles in (("ada", ["admin"]), ("otto", ["operator"]), ("vic", ["viewer"])):
            await ids.create_user(uid, roles=roles)
            tokens[uid] = {"Authorization": f"Bearer {(await ids.create_token(uid))[1]}"}
        await ids.create_user("bob", roles=["approver"])
        h = await _drive(app, planted, wait_status, wait_until, subjects=["customer:9"])
        await h.result(timeout=15)
        log = AuditLog(app, tmp_path / "audit.key")
        reads_before = [r async for r in log.rows() if r["action"] == "payload.read"]

        for who in ("otto", "vic"):
            run = (await client.get(f"/runs/{h.id}", headers=tokens[who])).json()
            assert run["status"] == "succeeded" and run["workflow"] == "kyc"
            assert run["input"] == {"$masked": "needs the payload:read permission"}
            steps = (await client.get(f"/runs/{h.id}/steps", headers=tokens[who])).json()
            assert [s["name"] for s in steps][:2] == ["lookup", "signal:confirmed"]
            assert all(
                s["output"] in (None, {"$masked": "needs the payload:read permission"})
                for s in steps
            )
            listed = (await client.get("/runs", headers=tokens[who])).json()["items"]
            assert all("$masked" in r["input"] for r in listed)
            text = json.dumps([run, steps, listed])
            assert planted["email"] not in text and planted["iban"] not in text
            denied = await client.get("/subjects/customer:9/export", headers=tokens[who])
            assert denied.status_code == 403
        assert [r async for r in log.rows() if r["action"] == "payload.read"] == reads_before

        run = (await client.get(f"/runs/{h.id}", headers=tokens["ada"])).json()
        assert run["input"]["email"] == planted["email"]
        steps = (await client.get(f"/runs/{h.id}/steps", headers=tokens["ada"])).json()
        assert steps[0]["output"]["iban"] == planted["iban"]
        export = (await client.get("/subjects/customer:9/export", headers=tokens["ada"])).json()
        assert export["runs"][0]["tasks"][0]["result"]["note"].endswith(planted["iban"])
        reads = [r async for r in log.rows() if r["action"] == "payload.read"][len(reads_before) :]
        assert [(r["actor"], r["subject"], r["data"]["what"]) for r in reads] == [
            ("ada", "run:" + h.id, "run"),
            ("ada", "run:" + h.id, "steps"),
            ("ada", "subject:customer:9", "export"),
        ]

        # Erasure: admin only; afterwards even the admin sees the payloads as erased.
        refused = await client.post("/subjects/customer:9/erase", headers=tokens["otto"])
        assert refused.status_code == 403
        erased = await client.post(
            "/subjects/customer:9/erase", headers=tokens["ada"], json={"reason": "ticket 5"}
        )
        assert erased.status_code == 200, erased.text
        assert erased.json()["runs"] == [h.id]
        run = (await client.get(f"/runs/{h.id}", headers=tokens["ada"])).json()
        assert run["status"] == "succeeded" and "$erased" in run["input"]
        assert (
            "$erased" in (await client.get(f"/runs/{h.id}", headers=tokens["vic"])).json()["input"]
        )
        assert (await client.get("/audit/verify", headers=tokens["ada"])).json()["ok"] is True


async def test_payloads_stored_in_the_clear_are_erased_and_sealed_from_then_on(
    make_app, monkeypatch, query, wait_status
):
    """A run from before encryption (or with it off): erasure overwrites its plaintext
    payloads; a run that continues after encryption is switched on gets a key."""

    def build() -> flowdesk.App:
        app = make_app()

        @app.workflow("legacy")
        async def legacy(ctx: flowdesk.Context, email: str) -> str:
            return email + " " + str(await ctx.wait_signal("go"))

        return app

    monkeypatch.setenv("FLOWDESK_PAYLOAD_ENCRYPTION", "off")
    plain = build()
    async with plain, plain.worker():
        done = await plain.start("legacy", {"email": "old@example.org"}, subjects=["p:1"])
        later = await plain.start("legacy", {"email": "new@example.org"})
        await plain.signal(done.id, "go", "now")
        assert await done.result(timeout=15) == "old@example.org now"
        await wait_status(plain, later.id, RunStatus.WAITING)
    ((raw,),) = query("SELECT input FROM runs WHERE id = ?", (done.id,))
    assert "old@example.org" in raw  # stored in the clear

    monkeypatch.setenv("FLOWDESK_PAYLOAD_ENCRYPTION", "on")
    sealed = build()
    async with sealed, sealed.worker():
        await sealed.signal(later.id, "go", "secret-signal")
        assert await later.result(timeout=15) == "new@example.org secret-signal"
        erased = await privacy.erase(sealed, "p:1")
        assert erased["runs"] == [done.id]
        assert privacy.is_erased((await sealed.get_run(done.id)).output)
    dump = repr(query("SELECT * FROM runs")) + repr(query("SELECT * FROM steps"))
    dump += repr(query("SELECT * FROM signals"))
    assert "old@example.org" not in dump  # overwritten by the erasure
    assert "secret-signal" not in dump  # sealed once encryption was on


async def test_a_run_found_by_its_key_has_its_payloads_opened(app):
    @app.workflow("keyed")
    async def keyed(ctx: flowdesk.Context, email: str) -> str:
        return email.upper()

    async with app, app.worker():
        handle = await app.start("keyed", {"email": "kim@example.org"}, idempotency_key="k-1")
        await handle.result(timeout=15)
        found = await app.store.run_by_key("k-1")
        missing = await app.store.run_by_key("no-such-key")
    assert found is not None and found.id == handle.id and missing is None
    assert found.input == {"email": "kim@example.org"} and found.output == "KIM@EXAMPLE.ORG"
