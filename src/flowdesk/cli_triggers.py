"""The ``flowdesk`` commands for triggers: ``watch`` (a file-drop folder), ``consume nats``,
``consume redis`` and ``consume kafka`` (event streams), and ``hooks list``.

Each runs until SIGTERM or Ctrl-C, with a worker in the same process unless ``--no-worker``
(then run ``flowdesk worker`` elsewhere). They take the same ``--app`` / ``--database-url``
options as every command (see `flowdesk.cli`) and register themselves on its Typer app when
this module is imported (`flowdesk.cli` imports it last).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from flowdesk.cli import AppOpt, DbOpt, JsonOpt, _app, _fail, _run, cli
from flowdesk.engine.app import App
from flowdesk.triggers import filedrop, webhooks

consume_cli = typer.Typer(
    help="Start one run per message of an event stream (NATS, Redis, Kafka).",
    no_args_is_help=True,
)
hooks_cli = typer.Typer(help="List the app's signed webhooks.", no_args_is_help=True)

WorkflowOpt = Annotated[str, typer.Option("--workflow", help="The workflow each item starts.")]
NoWorkerOpt = Annotated[
    bool, typer.Option("--no-worker", help="Only start runs; run workers elsewhere.")
]
InFlightOpt = Annotated[
    int,
    typer.Option(
        "--max-in-flight", min=1, help="At most this many messages between fetch and ack."
    ),
]


class _Runner(Protocol):
    stats: Any

    async def run(self) -> None: ...

    def stop(self) -> None: ...


def _logging() -> None:
    logging.basicConfig(
        level=os.environ.get("FLOWDESK_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _serve(the_app: App, runner: _Runner, *, worker: bool, banner: str) -> None:
    """Run ``runner`` (and a worker) until SIGTERM or Ctrl-C, then print its counts."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        await the_app.open()
        typer.echo(banner, err=True)
        if worker:
            async with the_app.worker():
                await runner.run()
        else:
            await runner.run()
        typer.echo(json.dumps({"stopped": dataclasses.asdict(runner.stats)}), err=True)

    _run(the_app, body)


@cli.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="The folder to watch.")],
    workflow: WorkflowOpt,
    pattern: Annotated[str, typer.Option(help="Only file names matching this glob.")] = "*",
    interval: Annotated[float, typer.Option(help="Seconds between scans.")] = 1.0,
    settle: Annotated[
        float, typer.Option(help="A file is taken once unchanged this many seconds.")
    ] = 1.0,
    max_bytes: Annotated[
        int | None, typer.Option(help="Larger files go to failed/ unread.")
    ] = None,
    no_worker: NoWorkerOpt = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Start WORKFLOW once per file dropped in FOLDER; move each file to done/ or failed/
    when its run ends (see flowdesk.triggers.filedrop)."""
    the_app = _app(app, database_url, required=True)
    _logging()
    try:
        watcher = filedrop.FileDrop(
            the_app,
            folder,
            workflow=workflow,
            pattern=pattern,
            interval=interval,
            settle=settle,
            max_bytes=max_bytes,
        )
    except Exception as exc:  # ConfigurationError, UnknownWorkflow
        _fail(str(exc))
    _serve(
        the_app,
        watcher,
        worker=not no_worker,
        banner=f"flowdesk watch {watcher.folder} -> {watcher.workflow}",
    )


@consume_cli.command("nats")
def consume_nats(
    workflow: WorkflowOpt,
    stream: Annotated[str, typer.Option(help="The JetStream stream.")],
    subject: Annotated[str, typer.Option(help="The subject (filter) to consume.")],
    durable: Annotated[str, typer.Option(help="The durable consumer (shared by the group).")],
    servers: Annotated[str, typer.Option(help="NATS URLs, comma-separated.")] = (
        "nats://127.0.0.1:4222"
    ),
    dead_letter_subject: Annotated[
        str | None, typer.Option(help="Default: flowdesk.dead.<stream>.")
    ] = None,
    ack_wait: Annotated[float, typer.Option(help="Seconds before an unacked redelivery.")] = 30.0,
    max_in_flight: InFlightOpt = 16,
    no_worker: NoWorkerOpt = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Start WORKFLOW once per message of a JetStream durable pull consumer."""
    from flowdesk.triggers import nats as nats_source

    the_app = _app(app, database_url, required=True)
    _logging()
    try:
        consumer = nats_source.NatsConsumer(
            the_app,
            workflow=workflow,
            stream=stream,
            subject=subject,
            durable=durable,
            servers=[s.strip() for s in servers.split(",") if s.strip()],
            dead_letter_subject=dead_letter_subject,
            ack_wait=ack_wait,
            max_in_flight=max_in_flight,
        )
    except Exception as exc:
        _fail(str(exc))
    _serve(
        the_app,
        consumer,
        worker=not no_worker,
        banner=f"flowdesk consume nats {stream}/{durable} ({subject}) -> {consumer.workflow}",
    )


@consume_cli.command("redis")
def consume_redis(
    workflow: WorkflowOpt,
    stream: Annotated[str, typer.Option(help="The stream key.")],
    group: Annotated[str, typer.Option(help="The consumer group (created if missing).")],
    consumer: Annotated[
        str | None, typer.Option(help="This consumer's name (default: host-pid).")
    ] = None,
    url: Annotated[str, typer.Option(help="Redis URL.")] = "redis://127.0.0.1:6379/0",
    field: Annotated[
        str, typer.Option(help="The entry field holding the JSON ('' takes the whole entry).")
    ] = "data",
    dead_stream: Annotated[str | None, typer.Option(help="Default: <stream>:dead.")] = None,
    claim_idle: Annotated[
        float, typer.Option(help="Take over other consumers' entries idle this many seconds.")
    ] = 30.0,
    max_in_flight: InFlightOpt = 16,
    no_worker: NoWorkerOpt = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Start WORKFLOW once per entry of a Redis stream, read by a consumer group."""
    from flowdesk.triggers import redis as redis_source

    the_app = _app(app, database_url, required=True)
    _logging()
    try:
        source = redis_source.RedisStreamConsumer(
            the_app,
            workflow=workflow,
            stream=stream,
            group=group,
            consumer=consumer,
            url=url,
            field=field or None,
            dead_stream=dead_stream,
            claim_idle=claim_idle,
            max_in_flight=max_in_flight,
        )
    except Exception as exc:
        _fail(str(exc))
    _serve(
        the_app,
        source,
        worker=not no_worker,
        banner=f"flowdesk consume redis {stream}/{group} as {source.consumer} -> {source.workflow}",
    )


@consume_cli.command("kafka")
def consume_kafka(
    workflow: WorkflowOpt,
    topic: Annotated[str, typer.Option(help="The topic.")],
    group: Annotated[str, typer.Option(help="The consumer group id.")],
    bootstrap_servers: Annotated[
        str, typer.Option(help="host:port, comma-separated.")
    ] = "127.0.0.1:9092",
    dead_letter_topic: Annotated[str | None, typer.Option(help="Default: <topic>.dead.")] = None,
    max_in_flight: InFlightOpt = 16,
    no_worker: NoWorkerOpt = False,
    app: AppOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Start WORKFLOW once per record of a Kafka topic, read by a consumer group."""
    from flowdesk.triggers import kafka as kafka_source

    the_app = _app(app, database_url, required=True)
    _logging()
    try:
        source = kafka_source.KafkaConsumer(
            the_app,
            workflow=workflow,
            topic=topic,
            group=group,
            bootstrap_servers=bootstrap_servers,
            dead_letter_topic=dead_letter_topic,
            max_in_flight=max_in_flight,
        )
    except Exception as exc:
        _fail(str(exc))
    _serve(
        the_app,
        source,
        worker=not no_worker,
        banner=f"flowdesk consume kafka {topic}/{group} -> {source.workflow}",
    )


@hooks_cli.command("list")
def hooks_list(app: AppOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False) -> None:
    """The webhooks the app registers (POST /hooks/<name> of `flowdesk serve`)."""
    the_app = _app(app, database_url, required=True)
    rows = [
        {
            "name": h.name,
            "path": f"/hooks/{h.name}",
            "mode": h.mode,
            "workflow": h.workflow,
            "signal": h.signal if h.mode == "signal" else None,
            "secret": f"${h.secret_env}" if h.secret_env else str(h.secret_file),
            "tolerance_seconds": h.tolerance,
        }
        for h in webhooks.hooks_of(the_app)
    ]
    if as_json:
        typer.echo(json.dumps({"hooks": rows}))
        return
    if not rows:
        typer.echo("no webhooks registered")
    for r in rows:
        target = r["workflow"] if r["mode"] == "start" else f"signal {r['signal']}"
        typer.echo(f"{r['path']:<30} {r['mode']:<7} {target:<30} secret {r['secret']}")


cli.add_typer(consume_cli, name="consume")
cli.add_typer(hooks_cli, name="hooks")
