"""The people and governance commands of the `flowdesk` command line, run as subprocesses
on a real SQLite file: users and tokens, human tasks against a real worker process, the
audit chain (verify, checkpoint, export; tampered with sqlite3), retention, and `serve`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import flowdesk
from flowdesk import errors
from flowdesk.governance.audit import AuditLog
from flowdesk.governance.identity import Identity

from .conftest import Flow, Proc

PEOPLE_APP = "peopleapp.py:app"
PEOPLE_APP_SOURCE = """
from __future__ import annotations

from pydantic import BaseModel

import flowdesk
from flowdesk.engine.tasks import Assignees

app = flowdesk.App()


class Approval(BaseModel):
    approved: bool
    comment: str = ""


@app.step
def total(amount: int) -> int:
    return amount * 2


@app.workflow("expense")
async def expense(ctx: flowdesk.Context, amount: int) -> dict:
    value = await ctx.step(total, amount)
    answer = await ctx.human_task(
        "approve",
        title=f"Approve an expense of {amount}",
        form=Approval,
        context={"amount": amount},
        candidates=Assignees(roles=["approver"]),
    )
    return {"total": value, "approved": answer.approved, "comment": answer.comment}
"""
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def people(flow: Flow) -> Flow:
    """The flow world with an app that hands work to people, and its schema created."""
    (flow.root / "peopleapp.py").write_text(PEOPLE_APP_SOURCE)
    flow.init_db()
    return flow


@pytest.fixture
def people_worker(people: Flow) -> Iterator[Proc]:
    proc = people.spawn(
        "worker",
        "--app",
        PEOPLE_APP,
        "--lease-seconds",
        "1.5",
        "--poll-interval",
        "0.05",
        name="people-worker",
    )
    people.wait_ready(proc)
    yield proc
    people.stop(proc)


def _ok(flow: Flow, *args: str) -> subprocess.CompletedProcess[str]:
    result = flow.cli(*args)
    assert result.returncode == 0, f"flowdesk {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _audit(flow: Flow) -> list[tuple[Any, ...]]:
    return flow.rows("SELECT seq, actor, action, subject, data FROM audit ORDER BY seq")


def _status(flow: Flow, run_id: str) -> str:
    return str(flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0])


def _wait_status(flow: Flow, run_id: str, status: str, watch: list[Proc]) -> None:
    flow.wait_until(
        lambda: _status(flow, run_id) == status,
        timeout=20,
        what=f"run {run_id} to be {status}",
        watch=watch,
    )


def _start_expense(flow: Flow, amount: int) -> str:
    out = flow.cli_json(
        "start", "expense", "--app", PEOPLE_APP, "--input", f'{{"amount": {amount}}}'
    )
    return str(out["id"])


def _task_of(flow: Flow, run_id: str, worker: Proc) -> str:
    flow.wait_until(
        lambda: bool(flow.rows("SELECT id FROM tasks WHERE run_id = ?", (run_id,))),
        timeout=20,
        what=f"the task of run {run_id}",
        watch=[worker],
    )
    return str(flow.rows("SELECT id FROM tasks WHERE run_id = ?", (run_id,))[0][0])


# -- users and tokens ----------------------------------------------------------------------
def test_users_create_list_and_set_roles(people: Flow) -> None:
    alice = people.cli_json(
        "users", "create", "alice", "--role", "admin", "--group", "ops", "--name", "Alice A"
    )
    assert (alice["id"], alice["name"], alice["roles"], alice["groups"]) == (
        "alice",
        "Alice A",
        ["admin"],
        ["ops"],
    )
    plain = _ok(
        people,
        "users",
        "create",
        "bob",
        "--role",
        "approver",
        "--role",
        "viewer",
        "--group",
        "finance",
        "--group",
        "emea",
        "--manager",
        "alice",
        "--database-url",
        people.url,
    )
    assert (
        plain.stdout.strip() == "user bob created (roles: approver, viewer; groups: emea, finance)"
    )
    _assert_clean_error(people.cli("users", "create", "carol", "--role", "boss"), "Unknown role")
    _assert_clean_error(people.cli("users", "create", "alice"), "already exists")

    listed = {u["id"]: u for u in people.cli_json("users", "list")}
    assert sorted(listed) == ["alice", "bob"]
    assert listed["bob"]["manager"] == "alice" and listed["bob"]["groups"] == ["emea", "finance"]
    assert listed["bob"]["roles"] == ["approver", "viewer"]
    table = _ok(people, "users", "list").stdout
    assert "Alice A" in table and "finance" in table

    changed = _ok(people, "users", "set-roles", "bob", "--role", "approver")
    assert changed.stdout.strip() == "user bob: roles approver, viewer -> approver"
    assert people.cli_json("users", "list")[1]["roles"] == ["approver"]
    _assert_clean_error(people.cli("users", "set-roles", "bob"), "--role")
    _assert_clean_error(people.cli("users", "set-roles", "nobody", "--role", "viewer"), "nobody")

    assert [(a, s) for _, _, a, s, _ in _audit(people)] == [
        ("user.created", "user:alice"),
        ("user.created", "user:bob"),
        ("user.roles_changed", "user:bob"),
    ]
    assert json.loads(_audit(people)[-1][4]) == {"from": ["approver", "viewer"], "to": ["approver"]}


def _authenticate(url: str, secret: str) -> str:
    async def check() -> str:
        app = flowdesk.App(url)
        try:
            return (await Identity(app).authenticate(secret)).id
        finally:
            await app.close()

    return asyncio.run(check())


def test_tokens_create_shows_the_secret_once_and_revoke_stops_it(people: Flow) -> None:
    _ok(people, "users", "create", "bob", "--role", "approver")
    created = _ok(people, "tokens", "create", "bob", "--name", "ci", "--expires-in", "3600")
    secrets = re.findall(r"fdt_[A-Za-z0-9_-]+", created.stdout)
    assert len(secrets) == 1, created.stdout
    secret = secrets[0]
    assert "shown only once" in created.stdout
    token_id = re.search(r"token (tok_[0-9a-f]+) for bob", created.stdout)
    assert token_id is not None, created.stdout

    listed = people.cli_json("tokens", "list", "--user", "bob")
    assert [(t["id"], t["name"], t["state"]) for t in listed] == [(token_id[1], "ci", "active")]
    assert listed[0]["expires_at"] is not None
    listing = _ok(people, "tokens", "list").stdout + json.dumps(listed)
    assert secret not in listing  # the secret is never shown again...
    stored = b"".join(p.read_bytes() for p in people.root.iterdir() if p.name.startswith("t.db"))
    assert secret.encode() not in stored  # ...and never stored, only its hash
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored
    assert people.cli_json("tokens", "list", "--user", "alice") == []
    assert _authenticate(people.url, secret) == "bob"

    as_json = people.cli_json("tokens", "create", "bob")
    assert as_json["secret"].startswith("fdt_") and as_json["shown_once"] is True

    revoked = _ok(people, "tokens", "revoke", token_id[1])
    assert revoked.stdout.strip() == f"token {token_id[1]} revoked"
    states = {t["id"]: t["state"] for t in people.cli_json("tokens", "list")}
    assert states == {token_id[1]: "revoked", as_json["id"]: "active"}
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        _authenticate(people.url, secret)
    _assert_clean_error(people.cli("tokens", "revoke", token_id[1]), "No active token")
    _assert_clean_error(people.cli("tokens", "create", "nobody"), "No user 'nobody'")
    _assert_clean_error(people.cli("tokens", "create", "bob", "--expires-in", "0"), "positive")

    actions = [(a, json.loads(d).get("token_id")) for _, _, a, _, d in _audit(people)]
    assert actions[1:] == [
        ("token.created", token_id[1]),
        ("token.created", as_json["id"]),
        ("token.revoked", token_id[1]),
    ]


# -- tasks ---------------------------------------------------------------------------------
def test_tasks_list_show_and_complete_resume_the_run(people: Flow, people_worker: Proc) -> None:
    _ok(people, "users", "create", "bob", "--role", "approver")
    _ok(people, "users", "create", "carol", "--role", "viewer")
    run_id = _start_expense(people, 5)
    task_id = _task_of(people, run_id, people_worker)
    _wait_status(people, run_id, "waiting", [people_worker])

    every = people.cli_json("tasks", "list")
    assert [(t["id"], t["status"], t["run_id"]) for t in every["tasks"]] == [
        (task_id, "open", run_id)
    ]
    assert every["tasks"][0]["candidates"]["roles"] == ["approver"]
    assert [t["id"] for t in people.cli_json("tasks", "list", "--user", "bob")["tasks"]] == [
        task_id
    ]
    assert people.cli_json("tasks", "list", "--user", "carol")["tasks"] == []
    assert people.cli_json("tasks", "list", "--status", "completed")["tasks"] == []
    _assert_clean_error(people.cli("tasks", "list", "--status", "done"), "--status")
    assert task_id in _ok(people, "tasks", "list", "--user", "bob").stdout

    shown = people.cli_json("tasks", "show", task_id)
    assert shown["title"] == "Approve an expense of 5"
    assert shown["context"] == {"amount": 5}
    assert set(shown["form_schema"]["properties"]) == {"approved", "comment"}
    assert shown["events"] == []
    text = _ok(people, "tasks", "show", task_id).stdout
    assert "Approve an expense of 5" in text and "role approver" in text
    _assert_clean_error(people.cli("tasks", "show", "no-such-task"), "no-such-task")

    # Not a candidate: the task is invisible to carol. Bad form data changes nothing.
    _assert_clean_error(
        people.cli("tasks", "complete", task_id, "--user", "carol", "--data", '{"approved": true}'),
        task_id,
    )
    _assert_clean_error(
        people.cli("tasks", "complete", task_id, "--user", "bob", "--data", '{"approved": "?"}'),
        "Invalid form data",
    )
    _assert_clean_error(
        people.cli("tasks", "complete", task_id, "--user", "bob", "--data", "{not json"),
        "--data is not valid JSON",
    )
    assert _status(people, run_id) == "waiting"

    done = _ok(
        people,
        "tasks",
        "complete",
        task_id,
        "--user",
        "bob",
        "--data",
        '{"approved": true, "comment": "fine"}',
    )
    assert done.stdout.strip() == f"task {task_id} completed by bob; run {run_id} resumes"
    _wait_status(people, run_id, "succeeded", [people_worker])
    run = people.cli_json("runs", "show", run_id)
    assert run["output"] == {"total": 10, "approved": True, "comment": "fine"}
    shown = people.cli_json("tasks", "show", task_id)
    assert (shown["status"], shown["completed_by"]) == ("completed", "bob")
    assert shown["result"] == {"approved": True, "comment": "fine"}
    assert [e["kind"] for e in shown["events"]] == ["completed"]

    completed = [r for r in _audit(people) if r[2] == "task.completed"]
    assert [(r[1], r[3]) for r in completed] == [("bob", "task:" + task_id)]
    assert _ok(people, "audit", "verify").returncode == 0


# -- audit ---------------------------------------------------------------------------------
def _some_history(flow: Flow) -> None:
    for user in ("alice", "bob", "carol"):
        _ok(flow, "users", "create", user)
    _ok(flow, "users", "set-roles", "bob", "--role", "approver")
    _ok(flow, "tokens", "create", "bob")


def test_audit_verify_and_checkpoint_on_an_intact_chain(people: Flow) -> None:
    _some_history(people)
    result = _ok(people, "audit", "verify")
    assert result.stdout.startswith("audit chain OK: 5 records, head at 5")
    assert "no signed checkpoint yet" in result.stdout

    signed = _ok(people, "audit", "checkpoint")
    assert signed.stdout.startswith("signed checkpoint at seq 5 ")
    key_file = Path(str(people.db) + ".audit-key")
    assert key_file.exists() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    report = people.cli_json("audit", "verify")
    assert report["ok"] is True and report["checkpoints"] == 1
    assert (report["records"], report["last_checkpoint"], report["unanchored"]) == (5, 5, 0)
    assert report["first_bad_seq"] is None and report["problems"] == []

    # A key file elsewhere: the same one, named explicitly, verifies; a missing one refuses.
    moved = people.root / "keys.pem"
    moved.write_bytes(key_file.read_bytes())
    assert people.cli_json("audit", "verify", "--key-file", str(moved))["ok"] is True
    _assert_clean_error(
        people.cli("audit", "verify", "--key-file", str(people.root / "missing.pem")),
        "no key file",
    )
    assert not (people.root / "missing.pem").exists()


def _tamper(flow: Flow, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(flow.db)
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def test_audit_verify_exits_1_and_names_the_first_bad_seq(people: Flow) -> None:
    _some_history(people)
    _ok(people, "audit", "checkpoint")
    _tamper(people, ("UPDATE audit SET data = ? WHERE seq = 3", ('{"roles":["admin"]}',)))

    result = people.cli("audit", "verify")
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "audit chain BROKEN: first bad seq 3" in result.stdout
    assert re.search(r"seq 3\s+data_altered\s+record 3: data does not match", result.stdout)

    as_json = people.cli("audit", "verify", "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["first_bad_seq"] == 3
    assert [(p["seq"], p["kind"]) for p in report["problems"]] == [(3, "data_altered")]


def test_audit_verify_reports_a_cut_tail_and_each_problem(people: Flow) -> None:
    _some_history(people)
    _tamper(
        people,
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 2", ()),
        ("DELETE FROM audit WHERE seq = 5", ()),
    )
    result = people.cli("audit", "verify")
    assert result.returncode == 1, result
    assert "first bad seq 2" in result.stdout
    assert re.search(r"seq 2\s+record_altered", result.stdout)
    assert re.search(r"seq 5\s+truncated .*head row", result.stdout)


def test_audit_export_writes_json_lines(people: Flow) -> None:
    _some_history(people)
    out = _ok(people, "audit", "export").stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["seq"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(lines, lines[1:], strict=False))
    assert lines[3]["action"] == "user.roles_changed"
    assert lines[3]["data"] == {"from": ["viewer"], "to": ["approver"]}

    later = _ok(people, "audit", "export", "--after-seq", "3").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in later] == [4, 5]
    about_bob = _ok(people, "audit", "export", "--subject", "user:bob").stdout.splitlines()
    assert [json.loads(line)["action"] for line in about_bob] == [
        "user.created",
        "user.roles_changed",
        "token.created",
    ]

    target = people.root / "audit.jsonl"
    written = _ok(people, "audit", "export", "--out", str(target))
    assert written.stdout == ""
    assert "exported 5 record(s)" in written.stderr
    assert target.read_text("utf-8") == out


# -- retention -----------------------------------------------------------------------------
def test_retention_run_purges_old_finished_runs(people: Flow, people_worker: Proc) -> None:
    _ok(people, "users", "create", "bob", "--role", "approver")
    runs = []
    for amount in (1, 2):
        run_id = _start_expense(people, amount)
        task_id = _task_of(people, run_id, people_worker)
        _ok(people, "tasks", "complete", task_id, "--user", "bob", "--data", '{"approved": true}')
        _wait_status(people, run_id, "succeeded", [people_worker])
        runs.append(run_id)
    old, recent = runs
    _tamper(
        people,
        ("UPDATE runs SET finished_at = finished_at - ? WHERE id = ?", (40 * DAY_MS, old)),
    )
    _assert_clean_error(people.cli("retention", "run", "--older-than", "30"), "30d")
    _assert_clean_error(people.cli("retention", "run", "--older-than", "3w"), "s, m, h or d")

    out = people.cli_json("retention", "run", "--older-than", "30d")
    assert out == {"purged": [old], "older_than_seconds": 30 * 86400.0}
    assert people.cli_json("runs", "show", old)["input"] is None
    assert people.cli_json("runs", "show", recent)["input"] == {"amount": 2}
    assert people.rows("SELECT result FROM tasks WHERE run_id = ?", (old,)) == [(None,)]
    again = _ok(people, "retention", "run", "--older-than", "720h")
    assert again.stdout.strip() == "purged 0 run(s) that finished more than 720h ago"

    last = _audit(people)[-1]
    assert (last[1], last[2]) == ("system:retention", "retention.purged")
    assert json.loads(last[4])["runs"] == [old]
    assert _ok(people, "audit", "verify").stdout.startswith("audit chain OK")


def _passwd(flow: Flow, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowdesk", "users", "passwd", *args],
        input=stdin,
        env=flow.env,
        cwd=flow.root,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_users_passwd_stores_an_argon2_hash_from_stdin(people: Flow) -> None:
    _ok(people, "users", "create", "dana", "--role", "approver")
    done = _passwd(people, "dana", "--password-stdin", stdin="a long enough secret\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "user dana: password set"
    ((stored,),) = people.rows("SELECT password_hash FROM users WHERE id = 'dana'")
    assert stored.startswith("$argon2id$") and "a long enough secret" not in stored

    async def check() -> tuple[str, str]:
        async with flowdesk.App(people.url) as app:
            ids = Identity(app)
            user = await ids.check_password("dana", "a long enough secret")
            with pytest.raises(errors.Unauthenticated):
                await ids.check_password("dana", "a long enough secreT")
            return user.id, "ok"

    assert asyncio.run(check()) == ("dana", "ok")
    piped = _passwd(people, "dana", stdin="another good secret\n")  # stdin is not a terminal
    assert piped.returncode == 0, piped.stderr
    _assert_clean_error(_passwd(people, "dana", "--password-stdin", stdin="short\n"), "8 to")
    _assert_clean_error(_passwd(people, "dana", "--password-stdin", stdin=""), "no password")
    _assert_clean_error(_passwd(people, "nobody", stdin="a long enough secret\n"), "No user")
    cleared = _passwd(people, "dana", "--clear", stdin="")
    assert cleared.returncode == 0 and "removed" in cleared.stdout
    actions = [row[2] for row in _audit(people)]
    assert actions.count("user.password_set") == 2 and "user.password_cleared" in actions


# -- serve ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_serve_hands_the_app_and_the_audit_log_to_the_server(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowdesk.cli import cli

    calls: list[dict[str, Any]] = []

    def serve(app: flowdesk.App, **kwargs: Any) -> Any:
        calls.append({"app": app, **kwargs})
        if kind == "async":

            async def running() -> None:
                await app.open()  # the command closes the app afterwards

            return running()
        return None

    fake = types.ModuleType("flowdesk.server.app")
    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flowdesk.server.app", fake)
    url = f"sqlite:///{tmp_path / 's.db'}"
    key = tmp_path / "serve.key"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["serve", "--database-url", url, "--port", "8123", "--no-worker", "--key-file", str(key)],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["serve", "--database-url", url])
    assert result.exit_code == 0, result.output

    first, second = calls
    assert (first["host"], first["port"], first["worker"]) == ("127.0.0.1", 8123, False)
    assert isinstance(first["audit"], AuditLog) and first["audit"].app is first["app"]
    assert first["audit"].key_file == key
    assert first["app"].database_url == url
    assert (second["host"], second["port"], second["worker"]) == ("127.0.0.1", 8000, True)
    assert second["audit"].key_file == Path(str(tmp_path / "s.db") + ".audit-key")


def test_serve_without_the_server_package_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowdesk.cli import cli

    monkeypatch.setitem(sys.modules, "flowdesk.server.app", None)
    result = CliRunner().invoke(cli, ["serve", "--database-url", f"sqlite:///{tmp_path}/s.db"])
    assert result.exit_code == 1
    assert "no HTTP server" in result.output
