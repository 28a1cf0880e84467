"""``flowdesk privacy`` (subject-access export, erasure, retention policies) and
``flowdesk keys`` (master key rotation): commands of `flowdesk.cli`, registered on its
Typer app when this module is imported (`flowdesk.cli` imports it last).

The CLI works on the database and the key file directly, as the operator of the
installation; the API's ``payload:read`` permission governs what API users see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdesk.cli import AppOpt, DbOpt, JsonOpt, _app, _fail, _run, _short, _when, cli
from flowdesk.cli_people import parse_age
from flowdesk.governance import privacy, retention

privacy_cli = typer.Typer(
    help="Data subjects: export what is stored about one, erase one; retention policies.",
    no_args_is_help=True,
)
keys_cli = typer.Typer(
    help="Master keys of payload encryption: rotate, retire.", no_args_is_help=True
)
cli.add_typer(privacy_cli, name="privacy")
cli.add_typer(keys_cli, name="keys")

SubjectArg = Annotated[str, typer.Argument(help="The data subject, such as customer:42.")]
KeyFile = Annotated[
    Path | None,
    typer.Option("--key-file", help="The master key file (default: the store's)."),
]


@privacy_cli.command("export")
def privacy_export(
    subject: SubjectArg,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything stored about SUBJECT: runs, inputs, results, signals, tasks and forms."""
    the_app = _app(app, database_url, existing=True)
    data = _run(the_app, lambda: privacy.export(the_app, subject))
    if as_json:
        typer.echo(json.dumps(data, ensure_ascii=False, default=_iso))
        return
    if not data["runs"]:
        typer.echo(f"nothing is stored about {subject}")
        return
    for run in data["runs"]:
        state = "ERASED" if run["erased"] else run["status"]
        typer.echo(f"run {run['id']}  {run['workflow']}  {state}  {_when(run['created_at'])}")
        typer.echo(f"  input   {_short(run['input'], 100)}")
        typer.echo(f"  output  {_short(run['output'], 100)}")
        for step in run["steps"]:
            typer.echo(f"  {step['seq']:>4} {step['name'][:28]:28} {_short(step['output'], 60)}")
        for task in run["tasks"]:
            typer.echo(f"  task {task['id']} {task['status']}: {_short(task['result'], 60)}")


@privacy_cli.command("erase")
def privacy_erase(
    subject: SubjectArg,
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit).")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Erase SUBJECT: destroy its data key and its runs' keys (one transaction, audited).
    Its runs keep their metadata; unfinished ones are cancelled. This cannot be undone."""
    if not yes:
        typer.confirm(
            f"Erase every payload stored about {subject}? This cannot be undone", abort=True
        )
    the_app = _app(app, database_url, existing=True)
    done = _run(the_app, lambda: privacy.erase(the_app, subject, reason, actor="cli"))
    if as_json:
        typer.echo(json.dumps(done))
        return
    typer.echo(
        f"erased {subject}: {len(done['runs'])} run(s), {len(done['cancelled'])} cancelled, "
        f"{len(done['keys'])} key(s) destroyed"
    )


@privacy_cli.command("retention")
def privacy_retention(
    workflow: Annotated[str, typer.Argument(help="The workflow.")],
    keep: Annotated[
        str | None, typer.Option(help="How long finished runs keep payloads: 30d, 12h, 90m.")
    ] = None,
    forever: Annotated[bool, typer.Option("--forever", help="Remove the policy.")] = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Set WORKFLOW's retention: after --keep, a finished run's payload keys are destroyed
    by the expiry job (`retention.install_policies`, or `flowdesk privacy expire`)."""
    if (keep is None) == (not forever):
        _fail("pass either --keep AGE or --forever")
    age = None if forever else parse_age(keep or "")
    the_app = _app(app, database_url)
    _run(the_app, lambda: retention.set_policy(the_app, workflow, age))
    typer.echo(f"{workflow}: " + ("payloads kept forever" if age is None else f"keep {keep}"))


@privacy_cli.command("expire")
def privacy_expire(app: AppOpt = None, database_url: DbOpt = None) -> None:
    """Destroy now the payload keys of finished runs past their workflow's retention."""
    the_app = _app(app, database_url, existing=True)
    ids = _run(the_app, lambda: retention.expire(the_app))
    typer.echo(f"destroyed the payload keys of {len(ids)} run(s)")


@keys_cli.command("rotate")
def keys_rotate(
    key_file: KeyFile = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a new master key (first in the key file) and wrap every data key with it.
    Payload ciphertexts are not touched. Retire the old key afterwards."""
    the_app = _app(app, database_url, existing=True)
    done = _run(the_app, lambda: privacy.rotate(the_app, key_file))
    if as_json:
        typer.echo(json.dumps(done))
        return
    typer.echo(
        f"new master key {done['key_id']} in {done['file']}; {done['rewrapped']} data key(s) "
        "re-wrapped. Back the key file up, then retire the old key: flowdesk keys retire ID"
    )


@keys_cli.command("retire")
def keys_retire(
    key_id: Annotated[str, typer.Argument(help="The old master key's id (mk-...).")],
    key_file: KeyFile = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Remove an old master key from the key file, once no data key needs it."""
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: privacy.retire(the_app, key_id, key_file))
    typer.echo(f"retired {key_id}")


@keys_cli.command("status")
def keys_status(app: AppOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Loaded master keys, and how many live data keys each one wraps."""
    the_app = _app(app, database_url, existing=True)

    async def body() -> dict[str, Any]:
        await the_app.open()
        ring = getattr(the_app.store, "keys", None)
        return {
            "encryption": ring is not None,
            "source": None if ring is None else ring.masters.source,
            "current": None if ring is None else ring.masters.current_id,
            "loaded": [] if ring is None else ring.masters.ids,
            "data_keys": await the_app.store.key_usage(),
        }

    info = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(info))
        return
    if not info["encryption"]:
        typer.echo("payload encryption is off (FLOWDESK_PAYLOAD_ENCRYPTION=off)")
    else:
        typer.echo(f"master keys from {info['source']}, current {info['current']}")
    for by, count in info["data_keys"].items():
        typer.echo(f"  {count:>8} data key(s) wrapped by {by}")


def _iso(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")
