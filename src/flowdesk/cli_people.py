"""The ``flowdesk`` commands for people and governance: users, API tokens, human tasks,
the audit chain, retention, and ``serve`` (the HTTP API).

They take the same ``--app`` / ``--database-url`` options as every command (see
`flowdesk.cli`) and register themselves on its Typer app when this module is imported
(`flowdesk.cli` imports it last).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdesk import errors
from flowdesk.cli import (
    AppOpt,
    DbOpt,
    JsonOpt,
    LogFormatOpt,
    _app,
    _fail,
    _parse_json,
    _run,
    _short,
    _when,
    cli,
)
from flowdesk.engine.app import App
from flowdesk.governance.audit import AuditLog, Report
from flowdesk.governance.identity import Identity
from flowdesk.humans.inbox import Inbox
from flowdesk.store.people import ROLES, TaskRecord, TaskStatus, TokenRecord, UserRecord

users_cli = typer.Typer(help="Create and list users; change their roles.", no_args_is_help=True)
tokens_cli = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
tasks_cli = typer.Typer(help="List, show and complete human tasks.", no_args_is_help=True)
audit_cli = typer.Typer(
    help="Verify the audit chain, sign checkpoints, export records.", no_args_is_help=True
)
retention_cli = typer.Typer(
    help="Delete the payloads of runs that finished long ago.", no_args_is_help=True
)

KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="The audit signing key (default: $FLOWDESK_AUDIT_KEY_FILE, else next to a "
        "SQLite database, else ./flowdesk-audit.key).",
    ),
]

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s`` as a timedelta (a unit is required)."""
    match = _AGE.match(text.lower())
    if match is None:
        _fail(f"--older-than {text!r}: use a number and a unit, s, m, h or d (e.g. 30d)")
    age = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if age <= timedelta(0):
        _fail(f"--older-than {text!r}: the age must be positive")
    return age


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# -- users ---------------------------------------------------------------------------------
def _user_json(user: UserRecord) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "roles": user.roles,
        "groups": user.groups,
        "manager": user.manager,
        "disabled": user.disabled,
        "created_at": user.created_at.isoformat(),
    }


RoleOpt = Annotated[
    list[str] | None,
    typer.Option("--role", help=f"A role, repeatable: {', '.join(ROLES)}."),
]


@users_cli.command("create")
def users_create(
    user_id: Annotated[str, typer.Argument(help="The user's id (lowercase, e.g. alice).")],
    role: RoleOpt = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="A group, repeatable.")] = None,
    manager: Annotated[
        str | None, typer.Option(help="The user's manager (escalations go to them).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name (default: the id).")] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a user (role viewer unless --role says otherwise)."""
    the_app = _app(app, database_url)  # may be the first command on a new database

    async def body() -> UserRecord:
        return await Identity(the_app).create_user(
            user_id, name=name, roles=role or ["viewer"], groups=group or [], manager=manager
        )

    user = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(_user_json(user), ensure_ascii=False))
    else:
        typer.echo(
            f"user {user.id} created (roles: {', '.join(user.roles) or 'none'}; "
            f"groups: {', '.join(user.groups) or 'none'})"
        )


@users_cli.command("list")
def users_list(app: AppOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List users."""
    the_app = _app(app, database_url, existing=True)
    users = _run(the_app, lambda: Identity(the_app).list_users())
    if as_json:
        typer.echo(json.dumps([_user_json(u) for u in users], ensure_ascii=False))
        return
    typer.echo(f"{'ID':24} {'NAME':24} {'ROLES':24} {'GROUPS':24} {'MANAGER':16} STATE")
    for u in users:
        typer.echo(
            f"{u.id[:24]:24} {u.name[:24]:24} {','.join(u.roles)[:24]:24} "
            f"{','.join(u.groups)[:24]:24} {(u.manager or '-')[:16]:16} "
            f"{'disabled' if u.disabled else 'active'}"
        )


@users_cli.command("set-roles")
def users_set_roles(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    role: RoleOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Replace a user's roles (recorded in the audit chain as user.roles_changed)."""
    if not role:
        _fail("give the new roles with --role (repeatable), e.g. --role approver")
    the_app = _app(app, database_url, existing=True)
    ident = Identity(the_app)

    async def body() -> tuple[UserRecord, UserRecord]:
        before = await ident.get_user(user_id)
        return before, await ident.update_user(user_id, roles=role)

    before, after = _run(the_app, body)
    typer.echo(
        f"user {after.id}: roles {', '.join(before.roles) or 'none'} -> "
        f"{', '.join(after.roles) or 'none'}"
    )


def _read_password(from_stdin: bool) -> str:
    """The new password: the first line of stdin when piped (or with --password-stdin),
    else typed twice at a hidden prompt."""
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            _fail("no password on stdin: pipe one line, e.g. `printf '%s\\n' \"$PW\" | ...`")
        return line.rstrip("\r\n")
    first: str = typer.prompt("New password", hide_input=True)
    second: str = typer.prompt("Repeat it", hide_input=True)
    if first != second:
        _fail("the two passwords differ; nothing changed")
    return first


@users_cli.command("passwd")
def users_passwd(
    user_id: Annotated[str, typer.Argument(help="The user's id.")],
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the password from stdin (its first line)."),
    ] = False,
    clear: Annotated[
        bool, typer.Option("--clear", help="Remove the password: no web sign-in any more.")
    ] = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Set the password a user signs in to the web UI with (stored as an argon2 hash;
    the user's open web sessions end)."""
    password = None if clear else _read_password(password_stdin)
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: Identity(the_app).set_password(user_id, password))
    typer.echo(f"user {user_id}: password {'removed' if clear else 'set'}")


# -- tokens --------------------------------------------------------------------------------
def _token_state(token: TokenRecord) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= datetime.now(UTC):
        return "expired"
    return "active"


def _token_json(token: TokenRecord) -> dict[str, Any]:
    return {
        "id": token.id,
        "user_id": token.user_id,
        "name": token.name,
        "state": _token_state(token),
        "created_at": token.created_at.isoformat(),
        "expires_at": _iso(token.expires_at),
        "revoked_at": _iso(token.revoked_at),
        "last_used_at": _iso(token.last_used_at),
    }


@tokens_cli.command("create")
def tokens_create(
    user_id: Annotated[str, typer.Argument(help="The user the token acts as.")],
    name: Annotated[str, typer.Option(help="What the token is for.")] = "api",
    expires_in: Annotated[
        float | None, typer.Option("--expires-in", help="Lifetime in seconds (default: none).")
    ] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API token for USER_ID and print its secret (shown only this once)."""
    if expires_in is not None and expires_in <= 0:
        _fail(f"--expires-in {expires_in}: a token's lifetime must be positive")
    the_app = _app(app, database_url, existing=True)
    lifetime = None if expires_in is None else timedelta(seconds=expires_in)
    token, secret = _run(
        the_app, lambda: Identity(the_app).create_token(user_id, name=name, expires_in=lifetime)
    )
    if as_json:
        out = {**_token_json(token), "secret": secret, "shown_once": True}
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    expires = "never" if token.expires_at is None else _when(token.expires_at)
    typer.echo(f"token {token.id} for {token.user_id} (name: {token.name}; expires: {expires})")
    typer.echo(f"secret: {secret}")
    typer.echo(
        "This secret is shown only once: store it now. flowdesk keeps only its hash and "
        "cannot show it again (create a new token if it is lost)."
    )


@tokens_cli.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's tokens.")] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""
    the_app = _app(app, database_url, existing=True)
    tokens = _run(the_app, lambda: Identity(the_app).list_tokens(user))
    if as_json:
        typer.echo(json.dumps([_token_json(t) for t in tokens], ensure_ascii=False))
        return
    typer.echo(f"{'ID':22} {'USER':20} {'NAME':16} {'STATE':8} {'CREATED':19} EXPIRES")
    for t in tokens:
        typer.echo(
            f"{t.id:22} {t.user_id[:20]:20} {t.name[:16]:16} {_token_state(t):8} "
            f"{_when(t.created_at)} {_when(t.expires_at)}"
        )


@tokens_cli.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_...), not its secret.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: Identity(the_app).revoke_token(token_id))
    typer.echo(f"token {token_id} revoked")


# -- tasks ---------------------------------------------------------------------------------
def _task_json(task: TaskRecord, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": task.id,
        "run_id": task.run_id,
        "seq": task.seq,
        "kind": task.kind,
        "title": task.title,
        "status": task.status.value,
        "priority": task.priority,
        "labels": task.labels,
        "candidates": {"users": task.users, "groups": task.groups, "roles": task.roles},
        "assignee": task.assignee,
        "initiator": task.initiator,
        "four_eyes": task.four_eyes,
        "due_at": _iso(task.due_at),
        "escalation_level": task.escalation_level,
        "completed_by": task.completed_by,
        "created_at": task.created_at.isoformat(),
        "completed_at": _iso(task.completed_at),
    }
    if full:
        out.update(
            context=task.context,
            form_schema=task.form_schema,
            draft=task.draft,
            result=task.result,
            escalation=task.escalation,
        )
    return out


async def _person(the_app: App, user_id: str) -> Any:
    return (await Identity(the_app).get_user(user_id)).person()


@tasks_cli.command("list")
def tasks_list(
    user: Annotated[
        str | None, typer.Option("--user", help="Only tasks this user may see (candidate).")
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help="open, claimed, completed or cancelled (repeatable)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue from a previous page.")] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List human tasks, newest first."""
    known = [s.value for s in TaskStatus]
    for s in status or []:
        if s not in known:
            _fail(f"--status {s!r}: use {', '.join(known)}")
    the_app = _app(app, database_url, existing=True)

    async def body() -> Any:
        who = None if user is None else await _person(the_app, user)
        return await Inbox(the_app).tasks(who, status=status or (), limit=limit, cursor=cursor)

    page = _run(the_app, body)
    if as_json:
        typer.echo(
            json.dumps(
                {"tasks": [_task_json(t) for t in page.items], "next_cursor": page.next_cursor},
                ensure_ascii=False,
            )
        )
        return
    typer.echo(f"{'ID':38} {'KIND':16} {'STATUS':9} {'ASSIGNEE':16} {'DUE':19} TITLE")
    for t in page.items:
        typer.echo(
            f"{t.id:38} {t.kind[:16]:16} {t.status.value:9} {(t.assignee or '-')[:16]:16} "
            f"{_when(t.due_at):19} {t.title}"
        )
    if page.next_cursor:
        typer.echo(f"more: --cursor {page.next_cursor}")


@tasks_cli.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a task: what it asks, its context and form, who may act, its history."""
    the_app = _app(app, database_url, existing=True)
    inbox = Inbox(the_app)

    async def body() -> Any:
        return await inbox.get(task_id), await inbox.events(task_id)

    task, events = _run(the_app, body)
    if as_json:
        out = _task_json(task, full=True)
        out["events"] = [
            {"at": e.at.isoformat(), "actor": e.actor, "kind": e.kind, "data": e.data}
            for e in events
        ]
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    typer.echo(f"task      {task.id}  ({task.kind}, priority {task.priority})")
    typer.echo(f"title     {task.title}")
    typer.echo(f"run       {task.run_id} (step {task.seq})")
    typer.echo(
        f"status    {task.status.value}"
        + (f", assigned to {task.assignee}" if task.assignee else "")
        + (f", completed by {task.completed_by}" if task.completed_by else "")
    )
    who = (
        [f"user {u}" for u in task.users]
        + [f"group {g}" for g in task.groups]
        + [f"role {r}" for r in task.roles]
    )
    typer.echo(f"who       {', '.join(who) or 'operators only'}")
    if task.four_eyes:
        typer.echo(f"4 eyes    {task.initiator or '-'} (who asked) cannot complete it")
    typer.echo(f"created   {_when(task.created_at)}   due {_when(task.due_at)}")
    typer.echo(f"context   {_short(task.context, 200)}")
    fields = task.form_schema.get("properties", {})
    typer.echo(f"form      {', '.join(fields) or '(no fields)'}")
    if task.result is not None:
        typer.echo(f"result    {_short(task.result, 200)}")
    if events:
        typer.echo("")
        for e in events:
            typer.echo(f"{_when(e.at)}  {e.actor:16} {e.kind:10} {_short(e.data)}")


@tasks_cli.command("complete")
def tasks_complete(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    user: Annotated[str, typer.Option("--user", help="Who completes it (a user id).")],
    data: Annotated[str, typer.Option("--data", help="The form's data as JSON.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Complete a task as USER with the form DATA (validated); its run resumes."""
    value = _parse_json(data, "--data")
    the_app = _app(app, database_url, existing=True)

    async def body() -> TaskRecord:
        who = await _person(the_app, user)
        return await Inbox(the_app).complete(task_id, who, value)

    task = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(_task_json(task, full=True), ensure_ascii=False))
    else:
        typer.echo(f"task {task.id} completed by {task.completed_by}; run {task.run_id} resumes")


# -- audit ---------------------------------------------------------------------------------
def _print_report(report: Report) -> None:
    if report.ok:
        anchored = (
            f"{report.checkpoints} signed checkpoint(s), the last at record "
            f"{report.last_checkpoint}"
            if report.checkpoints
            else "no signed checkpoint yet"
        )
        typer.echo(f"audit chain OK: {report.records} records, head at {report.head_seq}")
        typer.echo(f"  {anchored}")
        if report.unanchored:
            typer.echo(
                f"  {report.unanchored} record(s) not yet covered by a checkpoint, protected "
                "by the head row only (`flowdesk audit checkpoint` signs them)"
            )
        return
    typer.echo(
        f"audit chain BROKEN: first bad seq {report.first_bad_seq} "
        f"({report.records} records read, head row at {report.head_seq})"
    )
    for p in report.problems:
        typer.echo(f"  seq {p.seq:<8} {p.kind:15} {p.message}")
    if report.more_problems:
        typer.echo(f"  ... and {report.more_problems} more problem(s)")


@audit_cli.command("verify")
def audit_verify(
    key_file: KeyFileOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the whole chain and check the signed checkpoints. Exit code 0 when it is
    intact, 1 when a record was changed, removed or cut off (or it cannot be checked)."""
    the_app = _app(app, database_url, existing=True)
    report = _run(the_app, lambda: AuditLog(the_app, key_file).verify())
    if as_json:
        typer.echo(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


@audit_cli.command("checkpoint")
def audit_checkpoint(
    key_file: KeyFileOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign the chain's current head with the key file (created, mode 0600, if missing)."""
    the_app = _app(app, database_url, existing=True)
    log = AuditLog(the_app, key_file)
    try:
        cp = _run(the_app, log.checkpoint)
    except OSError as exc:
        _fail(f"key file {log.key_file}: {exc.strerror or exc}")
    if as_json:
        typer.echo(
            json.dumps(
                None
                if cp is None
                else {
                    "seq": cp.seq,
                    "hash": cp.hash,
                    "at": cp.at,
                    "key_id": cp.key_id,
                    "signature": cp.signature,
                    "key_file": str(log.key_file),
                }
            )
        )
    elif cp is None:
        typer.echo("the audit chain is empty: nothing to sign")
    else:
        typer.echo(
            f"signed checkpoint at seq {cp.seq} (hash {cp.hash[:16]}…, key {cp.key_id}, "
            f"key file {log.key_file})"
        )


@audit_cli.command("export")
def audit_export(
    out: Annotated[
        Path | None, typer.Option("--out", help="Write to this file (default: stdout).")
    ] = None,
    after_seq: Annotated[int, typer.Option("--after-seq", help="Only records after this seq.")] = 0,
    subject: Annotated[
        str | None, typer.Option(help="Only records about this subject (run:ID, task:ID...).")
    ] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Write audit records as JSON Lines, one record a line, in chain order."""
    the_app = _app(app, database_url, existing=True)
    log = AuditLog(the_app)
    if out is None:
        _run(the_app, lambda: log.export(sys.stdout, after_seq=after_seq, subject=subject))
        return
    try:
        handle = out.open("w", encoding="utf-8")
    except OSError as exc:
        _fail(f"--out {out}: {exc.strerror or exc}")
    with handle:
        count = _run(the_app, lambda: log.export(handle, after_seq=after_seq, subject=subject))
    typer.echo(f"exported {count} record(s) to {out}", err=True)


# -- retention -----------------------------------------------------------------------------
@retention_cli.command("run")
def retention_run(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished runs to purge: 30d, 12h, 90m, 45s.")
    ],
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete the payloads (inputs, outputs, step results, signals, task data) of runs that
    finished more than --older-than ago. Their rows and the audit chain stay."""
    from flowdesk.governance import retention

    age = parse_age(older_than)
    the_app = _app(app, database_url, existing=True)
    purged = _run(the_app, lambda: retention.purge(the_app, older_than=age))
    if as_json:
        typer.echo(json.dumps({"purged": purged, "older_than_seconds": age.total_seconds()}))
    else:
        typer.echo(f"purged {len(purged)} run(s) that finished more than {older_than} ago")


# -- serve ---------------------------------------------------------------------------------
@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Serve the API only; run workers elsewhere.")
    ] = False,
    key_file: KeyFileOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    log_format: LogFormatOpt = "text",
    metrics_access: Annotated[
        str,
        typer.Option(
            envvar="FLOWDESK_METRICS_ACCESS",
            help="Who may GET /metrics: 'local' (loopback clients; others need a token), "
            "'open' or 'token'.",
        ),
    ] = "local",
    documents: Annotated[
        Path | None,
        typer.Option(
            "--documents",
            help="The document archive folder, so the web UI shows review tasks' source "
            "documents (default: $FLOWDESK_DOCUMENTS, else none).",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API and the web UI (/ui), with a worker in the same process unless
    --no-worker. Sign-in cookies are signed with $FLOWDESK_SESSION_KEY (set the same value
    on every API server; without it each process makes its own)."""
    from flowdesk.observe import logs

    try:
        logs.configure(log_format)
    except errors.ConfigurationError as exc:
        _fail(str(exc))
    the_app = _app(app, database_url)
    try:
        server = importlib.import_module("flowdesk.server.app")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("flowdesk.server"):
            raise
        _fail("this flowdesk has no HTTP server (flowdesk.server.app is missing)")
    audit = AuditLog(the_app, key_file)
    folder = documents or (
        Path(os.environ["FLOWDESK_DOCUMENTS"]) if os.environ.get("FLOWDESK_DOCUMENTS") else None
    )
    archive = None
    if folder is not None:
        from flowdesk.documents.archive import Archive

        archive = Archive(folder)
    try:
        result = server.serve(
            the_app,
            host=host,
            port=port,
            worker=not no_worker,
            audit=audit,
            metrics_access=metrics_access,
            documents=archive,
            log_config=None,  # uvicorn's lines go through the handler configured above
        )
    except errors.FlowdeskError as exc:
        _fail(str(exc))
    if inspect.isawaitable(result):
        pending = result

        async def body() -> None:
            await pending

        _run(the_app, body)


cli.add_typer(users_cli, name="users")
cli.add_typer(tokens_cli, name="tokens")
cli.add_typer(tasks_cli, name="tasks")
cli.add_typer(audit_cli, name="audit")
cli.add_typer(retention_cli, name="retention")
