"""The ``flowdesk`` command line.

Every command takes ``--app module:attr`` (or ``path/to/file.py:attr``; default
``$FLOWDESK_APP``) and ``--database-url`` (default ``$FLOWDESK_DATABASE_URL``, else the
app's, else ``sqlite:///flowdesk.db``). Read commands take ``--json``.

Runs, schedules, workers and the schema are here; users, tokens, human tasks, the audit
chain, retention and ``serve`` are in `flowdesk.cli_people`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import migrations
from flowdesk.store import sqlite as sqlite_store
from flowdesk.store.base import RunRecord, StepRecord

T = TypeVar("T")

cli = typer.Typer(
    name="flowdesk",
    help="Durable workflows: run workers, start and inspect runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_cli = typer.Typer(help="List and inspect runs.", no_args_is_help=True)
cli.add_typer(runs_cli, name="runs")
db_cli = typer.Typer(help="Create or upgrade the database schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
schedules_cli = typer.Typer(help="List, pause and resume cron schedules.", no_args_is_help=True)
cli.add_typer(schedules_cli, name="schedules")

AppOpt = Annotated[
    str | None,
    typer.Option("--app", envvar="FLOWDESK_APP", help="The app: module:attr or file.py:attr."),
]
DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", envvar="FLOWDESK_DATABASE_URL", help="Database URL."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        "--log-format", envvar="FLOWDESK_LOG_FORMAT", help="Log lines as 'json' or 'text'."
    ),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_app(spec: str) -> App:
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return the `App` it names."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name).resolve()
            if not path.exists():
                _fail(f"--app {spec!r}: no file {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            if mod_spec is None or mod_spec.loader is None:
                _fail(f"--app {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[path.stem] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        _fail(f"--app {spec!r}: cannot import {module_name!r}: {exc}")
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        _fail(f"--app {spec!r}: {module_name}.{attr} is not a flowdesk.App")
    return app


def _app(
    app_spec: str | None,
    database_url: str | None,
    *,
    required: bool = False,
    existing: bool = False,
) -> App:
    """The app named by --app, else a bare one on --database-url. With ``existing``, an
    embedded database file must already exist (a read never creates one by mistake)."""
    if app_spec:
        app = load_app(app_spec)
        if database_url:
            app.database_url = database_url
    elif required:
        _fail("this command needs the app: pass --app module:attr or set FLOWDESK_APP")
    else:
        app = App(database_url)
    if existing and app.database_url.startswith("sqlite:"):
        path, _ = sqlite_store.parse_url(app.database_url)
        if path != ":memory:" and not Path(path).exists():
            _fail(f"no flowdesk database at {path}: check --database-url or FLOWDESK_DATABASE_URL")
    return app


def _run(app: App, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await body()
        finally:
            await app.close()

    try:
        return asyncio.run(main())
    except errors.FlowdeskError as exc:
        _fail(str(exc))


def _parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _run_json(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id,
        "workflow": run.workflow,
        "status": run.status.value,
        "queue": run.queue,
        "input": run.input,
        "output": run.output,
        "error": run.error,
        "idempotency_key": run.idempotency_key,
        "parent_id": run.parent_id,
        "forked_from": run.forked_from,
        "forked_seq": run.forked_seq,
        "priority": run.priority,
        "attempts": run.attempts,
        "waiting_for": run.waiting_for,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def _step_json(step: StepRecord) -> dict[str, Any]:
    return {
        "seq": step.seq,
        "name": step.name,
        "kind": step.kind,
        "status": step.status,
        "attempts": step.attempts,
        "output": step.output,
        "error": step.error,
        "started_at": step.started_at.isoformat(),
        "finished_at": step.finished_at.isoformat() if step.finished_at else None,
        "duration_ms": step.duration_ms,
    }


def _short(value: Any, width: int = 60) -> str:
    if isinstance(value, dict) and len(value) == 1 and "$erased" in value:
        return f"[erased: {value['$erased']}]"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command()
def worker(
    app: AppOpt = None,
    database_url: DbOpt = None,
    concurrency: Annotated[int, typer.Option(help="Runs executed at once.")] = 100,
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues.")] = None,
    lease_seconds: Annotated[
        float | None, typer.Option(help="Lease length; a dead worker's runs move after it.")
    ] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between polls.")] = None,
    log_format: LogFormatOpt = "text",
    metrics_port: Annotated[
        int | None,
        typer.Option(envvar="FLOWDESK_METRICS_PORT", help="Serve GET /metrics on this port."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(envvar="FLOWDESK_METRICS_HOST", help="Address for --metrics-port.")
    ] = "127.0.0.1",
) -> None:
    """Run a worker until SIGTERM or Ctrl-C. Its metrics, spans (with
    OTEL_EXPORTER_OTLP_ENDPOINT) and log context are on (`flowdesk.observe`)."""
    from flowdesk import observe

    try:
        observe.logs.configure(log_format)
    except errors.ConfigurationError as exc:
        _fail(str(exc))
    the_app = _app(app, database_url, required=True)
    if the_app.gateway is None:
        # No gateway wired by the app: the packaged local model answers `generate` when
        # the llm extra is installed (loaded on the first call); else ctx.model says what
        # to set up.
        from flowdesk.models import gateway as gateway_mod

        try:
            the_app.gateway = gateway_mod.Gateway.default()
        except errors.ConfigurationError:
            pass
    if lease_seconds is not None:
        the_app.lease_ms = int(lease_seconds * 1000)
        the_app.heartbeat_interval = lease_seconds / 3
    if poll_interval is not None:
        the_app.poll_interval = poll_interval
    try:
        observed = observe.instrument(the_app)
    except errors.ConfigurationError as exc:
        _fail(str(exc))
    w = the_app.worker(
        concurrency=concurrency,
        queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
    )

    async def body() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.stop)
        await the_app.open()
        typer.echo(
            f"flowdesk worker {w.id} on {the_app.database_url} "
            f"({len(the_app.registry.workflows)} workflows, concurrency {concurrency})",
            err=True,
        )
        if metrics_port is None or observed.metrics is None:
            await w.run()
            return
        server = await observe.metrics.serve(observed.metrics, metrics_host, metrics_port)
        address = server.sockets[0].getsockname()
        typer.echo(f"metrics on http://{address[0]}:{address[1]}/metrics", err=True)
        try:
            await w.run()
        finally:
            server.close()
            await server.wait_closed()

    _run(the_app, body)
    # Idle step threads end as soon as the pool is shut down; one that is still busy
    # after a moment runs a sync step that ignores its timeout and cannot be stopped.
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread.name.startswith("flowdesk-step"):
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t.name.startswith("flowdesk-step")]
    if stuck:
        # Its run was given back to the queue; do not wait for the thread.
        typer.echo(f"worker stopped; {len(stuck)} step thread(s) still running, exiting", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@cli.command()
def start(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    input: Annotated[str | None, typer.Option("--input", help="Input as JSON.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Start at most once.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: seconds.")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (default: the workflow's).")] = None,
    priority: Annotated[int, typer.Option(help="Higher starts first in its queue.")] = 0,
    dedupe_key: Annotated[
        str | None, typer.Option(help="Return the queued run with this key, if any.")
    ] = None,
    run_timeout: Annotated[
        float | None, typer.Option("--run-timeout", help="Cancel the run after N seconds.")
    ] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a run of WORKFLOW."""
    the_app = _app(app, database_url, required=True)
    payload = _parse_json(input, "--input")

    async def body() -> None:
        handle = await the_app.start(
            workflow,
            payload,
            idempotency_key=idempotency_key,
            queue=queue,
            priority=priority,
            dedupe_key=dedupe_key,
            timeout=run_timeout,
        )
        out: dict[str, Any] = {"id": handle.id, "workflow": workflow, "created": handle.created}
        if wait:
            run = await the_app.wait(handle.id, timeout=timeout)
            out.update(status=run.status.value, output=run.output, error=run.error)
        if as_json:
            typer.echo(json.dumps(out, ensure_ascii=False))
        else:
            typer.echo(handle.id if handle.created else f"{handle.id} (existing run)")
            if wait:
                typer.echo(f"{out['status']}: {_short(out['output'] or out['error'], 200)}")
        if wait and out["status"] != "succeeded":
            raise typer.Exit(1)

    _run(the_app, body)


@runs_cli.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue from a previous page.")] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    the_app = _app(app, database_url, existing=True)

    async def body() -> None:
        page = await the_app.list_runs(status=status, workflow=workflow, limit=limit, cursor=cursor)
        if as_json:
            typer.echo(
                json.dumps(
                    {"runs": [_run_json(r) for r in page.items], "next_cursor": page.next_cursor},
                    ensure_ascii=False,
                )
            )
            return
        typer.echo(f"{'ID':34} {'WORKFLOW':24} {'STATUS':10} {'CREATED':19}")
        for r in page.items:
            typer.echo(f"{r.id:34} {r.workflow[:24]:24} {r.status.value:10} {_when(r.created_at)}")
        if page.next_cursor:
            typer.echo(f"more: --cursor {page.next_cursor}")

    _run(the_app, body)


@runs_cli.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run: status, input, output, error, and its step timeline."""
    the_app = _app(app, database_url, existing=True)

    async def body() -> None:
        run = await the_app.get_run(run_id)
        steps = await the_app.steps(run_id)
        if as_json:
            typer.echo(
                json.dumps(
                    {**_run_json(run), "steps": [_step_json(s) for s in steps]}, ensure_ascii=False
                )
            )
            return
        typer.echo(f"run       {run.id}")
        typer.echo(f"workflow  {run.workflow}")
        if run.forked_from:
            typer.echo(f"forked    from {run.forked_from} at step {run.forked_seq}")
        if run.parent_id:
            typer.echo(f"parent    {run.parent_id} (step {run.parent_seq})")
        typer.echo(
            f"status    {run.status.value}"
            + (f" (waiting for {', '.join(run.waiting_for)})" if run.waiting_for else "")
        )
        typer.echo(f"created   {_when(run.created_at)}   finished {_when(run.finished_at)}")
        typer.echo(f"input     {_short(run.input, 200)}")
        if run.output is not None:
            typer.echo(f"output    {_short(run.output, 200)}")
        if run.error is not None and "$erased" in run.error:
            typer.echo(f"error     {_short(run.error)}")
        elif run.error is not None:
            typer.echo(f"error     {run.error.get('type')}: {run.error.get('message')}")
        typer.echo("")
        typer.echo(f"{'SEQ':>4} {'STEP':28} {'STATUS':8} {'TRIES':>5} {'MS':>9}  RESULT")
        for s in steps:
            ms = "" if s.duration_ms is None else f"{s.duration_ms:.1f}"
            detail = (
                f"{s.error.get('type')}: {s.error.get('message')}"
                if s.error and "$erased" not in s.error
                else _short(s.error or s.output)
            )
            typer.echo(
                f"{s.seq:>4} {s.name[:28]:28} {s.status:8} {s.attempts:>5} {ms:>9}  {detail}"
            )

    _run(the_app, body)


@cli.command("signal")
def signal_(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    name: Annotated[str, typer.Argument(help="Signal name.")],
    payload: Annotated[str | None, typer.Option(help="Payload as JSON.")] = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Send signal NAME to a run."""
    the_app = _app(app, database_url, existing=True)
    value = _parse_json(payload, "--payload")
    _run(the_app, lambda: the_app.signal(run_id, name, value))
    typer.echo(f"signal {name!r} sent to {run_id}")


@cli.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    reason: Annotated[str, typer.Option(help="Why; stored on the run.")] = "cancelled by request",
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Cancel a run (and its children)."""
    the_app = _app(app, database_url, existing=True)
    status = _run(the_app, lambda: the_app.cancel(run_id, reason))
    if status.value == "running":
        typer.echo(f"{run_id}: cancellation requested; it stops at its next step")
    else:
        typer.echo(f"{run_id}: {status.value}")


@cli.command()
def retry(
    run_id: Annotated[str, typer.Argument(help="The run's id.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Resume a failed run from the step it failed at."""
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: the_app.retry(run_id))
    typer.echo(f"{run_id}: queued again")


@cli.command()
def fork(
    run_id: Annotated[str, typer.Argument(help="The run to fork.")],
    from_step: Annotated[int, typer.Option("--from-step", help="First step to run again.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a new run that keeps RUN_ID's results before --from-step and runs from there."""
    if from_step < 1:
        _fail(f"--from-step {from_step}: steps are numbered from 1 (see `flowdesk runs show`)")
    the_app = _app(app, database_url, existing=True)

    async def body() -> None:
        handle = await the_app.fork(run_id, from_step)
        run = await the_app.get_run(handle.id)
        if as_json:
            typer.echo(
                json.dumps({"id": handle.id, "forked_from": run_id, "forked_seq": run.forked_seq})
            )
        else:
            typer.echo(f"{handle.id} (forked from {run_id} at step {run.forked_seq})")

    _run(the_app, body)


@schedules_cli.command("list")
def schedules_list(
    app: AppOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False
) -> None:
    """List schedules with their next tick."""
    the_app = _app(app, database_url, existing=True)

    async def body() -> None:
        items = await the_app.schedules()
        if as_json:
            typer.echo(
                json.dumps(
                    [
                        {
                            "name": s.name,
                            "workflow": s.workflow,
                            "cron": s.cron,
                            "catchup": s.catchup,
                            "paused": s.paused,
                            "next_tick": s.next_tick.isoformat(),
                            "last_tick": s.last_tick.isoformat() if s.last_tick else None,
                        }
                        for s in items
                    ]
                )
            )
            return
        typer.echo(f"{'NAME':28} {'CRON':16} {'CATCHUP':8} {'STATE':7} {'NEXT':19} LAST")
        for s in items:
            typer.echo(
                f"{s.name[:28]:28} {s.cron:16} {s.catchup:8} "
                f"{'paused' if s.paused else 'active':7} {_when(s.next_tick)} "
                f"{_when(s.last_tick)}"
            )

    _run(the_app, body)


@schedules_cli.command("pause")
def schedules_pause(
    name: Annotated[str, typer.Argument(help="Schedule (workflow) name.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Pause a schedule: no run starts until it is resumed."""
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: the_app.pause_schedule(name))
    typer.echo(f"schedule {name} paused")


@schedules_cli.command("resume")
def schedules_resume(
    name: Annotated[str, typer.Argument(help="Schedule (workflow) name.")],
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Resume a schedule from its next tick (ticks while paused are skipped)."""
    the_app = _app(app, database_url, existing=True)
    _run(the_app, lambda: the_app.resume_schedule(name))
    typer.echo(f"schedule {name} resumed")


@db_cli.command("upgrade")
def db_upgrade(app: AppOpt = None, database_url: DbOpt = None) -> None:
    """Create the schema, or apply the migrations it lacks (safe to run from many hosts at
    once: they take turns). Starting any flowdesk process does the same."""
    the_app = _app(app, database_url)

    async def body() -> str:
        await the_app.open()
        return the_app.store.url

    url = _run(the_app, body)
    dialect = "postgres" if not url.startswith("sqlite") and not url.endswith(".db") else "sqlite"
    version = migrations.latest(dialect)
    typer.echo(f"schema at version {version} ({dialect})")


# The other command groups register themselves on `cli`; imported last, as they use the
# helpers above: users, tokens, tasks, audit, retention, serve (cli_people); local models,
# usage, flags and drift (cli_models, cli_models_usage); documents and demo data
# (cli_documents); watch, consume and hooks (cli_triggers).
from flowdesk import (  # noqa: E402
    cli_documents,  # noqa: F401
    cli_models,  # noqa: F401
    cli_models_usage,  # noqa: F401
    cli_people,  # noqa: F401
    cli_privacy,  # noqa: F401
    cli_triggers,  # noqa: F401
)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
