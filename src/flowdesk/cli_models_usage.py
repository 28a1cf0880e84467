"""The ``flowdesk models`` commands for cost, budgets, flags, rollouts and drift:

* ``usage [--run R] [--workflow W] [--task T] [--by COLS]``: model calls, tokens and cost
  from the ledger (one run's calls one by one, or sums per workflow, task and model);
* ``budgets``: each configured budget's spend in its current window;
* ``flag TASK ROUTE on|off|clear`` and ``flags``: switch a task's route (a model of its
  chain, ``canary`` or ``shadow``) in every process, and list the switches;
* ``rollout TASK``: the versions in force and what the ledger and the shadow comparisons
  recorded about each (calls, errors, latency, cost, confidence, agreement);
* ``drift TASK [--rebase | --reset]``: check the task's drift now, store the report and
  alert level, and print it.

They take ``--app`` / ``--database-url`` as every command does (see `flowdesk.cli`), and
``--config`` (default ``$FLOWDESK_MODELS_CONFIG``): the gateway's TOML, for the budgets,
flags, routes and drift thresholds it sets. Without it they use the app's wired gateway
(`flowdesk.models.rollout.wire`), else the defaults. `register` adds them to a Typer group.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdesk.cli import AppOpt, DbOpt, JsonOpt, _app, _fail, _run, cli
from flowdesk.engine.app import App
from flowdesk.models import budgets, drift, ledger, rollout
from flowdesk.models import config as cfg
from flowdesk.models.gateway import Gateway
from flowdesk.store import sql_models

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="FLOWDESK_MODELS_CONFIG",
        help="The gateway's TOML file (budgets, flags, routes, drift thresholds).",
    ),
]


class _Parts:
    """What the commands need of the gateway's setup: from --config, else from the app's
    wired gateway, else nothing (defaults)."""

    def __init__(self, the_app: App, config_path: Path | None) -> None:
        self.config: cfg.GatewayConfig | None = None
        self.settings: rollout.Settings | None = None
        if config_path is not None:
            self.config, self.settings = rollout.read_toml(config_path)
            return
        gateway = the_app.gateway
        if isinstance(gateway, Gateway):
            self.config = gateway.config
            found: dict[str, Any] = {}
            if isinstance(gateway.versions, rollout.Rollouts):
                found["flags"] = gateway.versions.config_flags
            for part in gateway.interceptors:
                if isinstance(part, budgets.Budgets):
                    found["budgets"] = part.budgets
                    found["limits"] = part.limits
                if isinstance(part, ledger.Ledger):
                    found["prices"] = part.prices.table
            for observer in gateway.observers:
                monitor = getattr(observer, "__self__", None)
                if isinstance(monitor, drift.DriftMonitor):
                    found["drift"] = monitor.settings
            self.settings = rollout.Settings.model_validate(found)

    def drift_settings(self) -> drift.DriftSettings:
        return self.settings.drift if self.settings is not None else drift.DriftSettings()

    def rollouts(self, the_app: App) -> rollout.Rollouts | None:
        if self.config is None:
            return None
        flags = self.settings.flags if self.settings is not None else {}
        return rollout.Rollouts(the_app, self.config, flags=flags, ttl_s=0)


def _parts(the_app: App, config_path: Path | None) -> _Parts:
    try:
        return _Parts(the_app, config_path)
    except Exception as exc:  # a bad config file: one line, not a traceback
        _fail(str(exc))


def _ms(value: int | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value / 1000, tz=UTC).isoformat()


def _usage_json(row: sql_models.UsageRow) -> dict[str, Any]:
    return {
        **row.key,
        "calls": row.calls,
        "errors": row.errors,
        "tokens_in": row.tokens_in,
        "tokens_out": row.tokens_out,
        "cost_usd": round(row.cost_usd, 9),
        "latency_ms_avg": round(row.latency_ms_avg, 3),
        "latency_ms_max": round(row.latency_ms_max, 3),
    }


def _call_json(row: sql_models.LedgerRow) -> dict[str, Any]:
    return {
        "at": _ms(row.at),
        "seq": row.seq,
        "workflow": row.workflow,
        "task": row.task,
        "model": row.model,
        "provider": row.provider,
        "version": row.version,
        "role": row.role,
        "status": row.status,
        "error": row.error,
        "tokens_in": row.tokens_in,
        "tokens_out": row.tokens_out,
        "cost_usd": row.cost_usd,
        "latency_ms": row.latency_ms,
        "confidence": row.confidence,
    }


def usage(
    run: Annotated[str | None, typer.Option("--run", help="One run's calls.")] = None,
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="Only this workflow's calls.")
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="Only this model task.")] = None,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Sum per these columns (comma-separated: "
            + ", ".join(sql_models.USAGE_GROUPS)
            + ").",
        ),
    ] = "workflow,task,model",
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Model calls, tokens and cost (USD) from the ledger: per workflow, task and model;
    with --run, that run's calls one by one."""
    the_app = _app(app, database_url, existing=True)
    columns = tuple(c.strip() for c in by.split(",") if c.strip())
    unknown = [c for c in columns if c not in sql_models.USAGE_GROUPS]
    if unknown:
        _fail(f"--by {by!r}: unknown columns {unknown}; use {', '.join(sql_models.USAGE_GROUPS)}")

    async def body() -> dict[str, Any]:
        rows = await ledger.usage(the_app, by=columns, run_id=run, workflow=workflow, task=task)
        total = await ledger.usage(the_app, by=(), run_id=run, workflow=workflow, task=task)
        out: dict[str, Any] = {
            "filter": {"run_id": run, "workflow": workflow, "task": task},
            "rows": [_usage_json(r) for r in rows],
            "total": _usage_json(total[0]) if total else _usage_json(_empty()),
        }
        if run is not None:
            out["calls"] = [_call_json(c) for c in await ledger.calls(the_app, run)]
        return out

    result = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    if run is not None:
        for c in result["calls"]:
            typer.echo(
                f"seq {c['seq']!s:>4}  {c['task']:<20} {c['model']:<16} {c['version']:<12} "
                f"{c['role']:<7} {c['status']:<5} {c['tokens_in']:>6}/{c['tokens_out']:<6} "
                f"{c['cost_usd']:.6f} USD  {c['latency_ms']:.1f} ms"
            )
    else:
        for r in result["rows"]:
            name = "  ".join("-" if r[c] is None else str(r[c]) for c in columns)
            typer.echo(
                f"{name:<50} {r['calls']:>7} calls {r['errors']:>5} errors "
                f"{r['cost_usd']:.6f} USD  {r['latency_ms_avg']:.1f} ms avg"
            )
    t = result["total"]
    typer.echo(
        f"total: {t['calls']} calls, {t['tokens_in']} tokens in, {t['tokens_out']} out, "
        f"{t['cost_usd']:.6f} USD"
    )


def _empty() -> sql_models.UsageRow:
    return sql_models.UsageRow(
        key={},
        calls=0,
        errors=0,
        tokens_in=0,
        tokens_out=0,
        cost_usd=0.0,
        latency_ms_avg=0.0,
        latency_ms_max=0.0,
    )


def budgets_cmd(
    config: ConfigOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Each configured budget's spend in its current window."""
    the_app = _app(app, database_url, existing=True)
    parts = _parts(the_app, config)
    settings = parts.settings or rollout.Settings()
    guard = budgets.Budgets(the_app, settings.budgets, settings.limits)

    async def body() -> list[budgets.BudgetStatus]:
        return await guard.status()

    rows = _run(the_app, body)
    out = [
        {
            "budget": r.key,
            "window": r.window,
            "window_start": _ms(r.window_start) if r.window != "total" else None,
            "limit_usd": r.limit_usd,
            "spent_usd": round(r.spent_usd, 9),
            "left_usd": round(r.left_usd, 9),
            "on_exceed": r.on_exceed,
        }
        for r in rows
    ]
    if as_json:
        typer.echo(json.dumps(out))
        return
    if not out:
        typer.echo("no budgets configured (add [[budgets]] to the gateway's TOML)")
    for b in out:
        typer.echo(
            f"{b['budget']:<40} {b['window']:<6} {b['spent_usd']:.6f} of {b['limit_usd']:g} USD "
            f"({b['left_usd']:.6f} left, {b['on_exceed']})"
        )


def flag(
    task: Annotated[str, typer.Argument(help="The model task.")],
    route: Annotated[str, typer.Argument(help="A model of its chain, 'canary' or 'shadow'.")],
    state: Annotated[str, typer.Argument(help="on, off, or clear (back to the config).")],
    config: ConfigOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch a route of a task on or off in every process (within a second)."""
    states = {"on": True, "off": False, "clear": None}
    if state.lower() not in states:
        _fail(f"{state!r}: use on, off or clear")
    enabled = states[state.lower()]
    the_app = _app(app, database_url, existing=True)
    parts = _parts(the_app, config)

    async def body() -> None:
        await rollout.set_flag(the_app, task, route, enabled, config=parts.config)

    _run(the_app, body)
    if as_json:
        typer.echo(json.dumps({"task": task, "route": route, "enabled": enabled}))
    else:
        typer.echo(f"{task} {route}: {state.lower()}")


def flags(
    config: ConfigOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every route's switch: the runtime overrides, and with a config the effective
    switch of each route and where it comes from."""
    the_app = _app(app, database_url, existing=True)
    parts = _parts(the_app, config)
    rollouts = parts.rollouts(the_app)

    async def body() -> list[dict[str, Any]]:
        if rollouts is not None:
            return [
                {
                    "task": v.task,
                    "route": v.route,
                    "enabled": v.enabled,
                    "source": v.source,
                    "actor": v.actor,
                    "updated_at": _ms(v.updated_at),
                }
                for v in await rollouts.flags()
            ]
        await the_app.open()
        return [
            {
                "task": r.task,
                "route": r.route,
                "enabled": r.enabled,
                "source": "override",
                "actor": r.actor,
                "updated_at": _ms(r.updated_at),
            }
            for r in await sql_models.models_store(the_app.store).model_flags()
        ]

    rows = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        typer.echo(
            f"{r['task']:<24} {r['route']:<20} {'on' if r['enabled'] else 'off':<4} {r['source']}"
        )


def rollout_cmd(
    task: Annotated[str, typer.Argument(help="The model task.")],
    config: ConfigOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Versions in force and, per version and role, calls, errors, latency, cost and
    confidence; the shadows' agreement with the answering version."""
    the_app = _app(app, database_url, existing=True)
    parts = _parts(the_app, config)
    rollouts = parts.rollouts(the_app)

    async def body() -> dict[str, Any]:
        return await rollout.rollout_report(the_app, task, rollouts=rollouts)

    report = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(report))
        return
    for model, state in report.get("in_force", {}).items():
        typer.echo(
            f"{model}: current {state['current']}, canary {state['canary']}, shadow "
            f"{state['shadow']} ({state['source']})"
        )
    for v in report["versions"]:
        typer.echo(
            f"{v['model']:<16} {v['version']:<14} {v['role']:<8} {v['calls']:>7} calls "
            f"{v['errors']:>5} errors {v['latency_ms_avg']:>8.1f} ms "
            f"{v['cost_usd_avg']:.6f} USD/call conf {v['confidence_avg']}"
        )
    for s in report["shadow"]:
        typer.echo(
            f"shadow {s['model']} {s['shadow_version']} beside {s['version']}: agreement "
            f"{s['agreement']} over {s['compared']} answers, {s['shadow_errors']} errors"
        )


def drift_cmd(
    task: Annotated[str, typer.Argument(help="The model task.")],
    rebase: Annotated[
        bool, typer.Option("--rebase", help="Make the live window the new reference.")
    ] = False,
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Drop every sample; the next answers fill a new reference."),
    ] = False,
    config: ConfigOpt = None,
    app: AppOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the task's drift now (live window against the reference: PSI, KS and
    chi-square per feature), store the report and alert level, and print it."""
    if rebase and reset:
        _fail("--rebase and --reset exclude each other")
    the_app = _app(app, database_url, existing=True)
    monitor = drift.DriftMonitor(the_app, _parts(the_app, config).drift_settings())

    async def body() -> dict[str, Any]:
        if rebase or reset:
            size = await monitor.reset(task, rebase=rebase, actor="cli")
            return {"task": task, "reset": "rebase" if rebase else "reset", "reference": size}
        return await monitor.check(task)

    report = _run(the_app, body)
    if as_json:
        typer.echo(json.dumps(report))
        return
    if "reset" in report:
        typer.echo(f"{task}: drift {report['reset']}, reference holds {report['reference']}")
        return
    typer.echo(
        f"{task}: drift level {report['level']} ({report['status']}; reference "
        f"{report['reference']}, live {report['live']})"
    )
    for name, f in report["features"].items():
        mark = "DRIFT" if f["drifted"] else "ok"
        typer.echo(
            f"  {name:<18} psi {f['psi']:.3f}  {f['test']} p {f['p_value']:.3g}  {mark} "
            f"{f['level'] if f['drifted'] else ''}"
        )


def register(group: typer.Typer) -> None:
    """Add these commands to ``group`` (the ``flowdesk models`` Typer)."""
    group.command("usage")(usage)
    group.command("budgets")(budgets_cmd)
    group.command("flag")(flag)
    group.command("flags")(flags)
    group.command("rollout")(rollout_cmd)
    group.command("drift")(drift_cmd)


# The `flowdesk models` group; `flowdesk.cli_models` adds the local classifiers' commands
# (train, eval, predict, list, promote, rollback, canary, shadow) to it.
models_cli = typer.Typer(
    help="Model usage and cost, budgets, route flags, rollouts and drift.", no_args_is_help=True
)
register(models_cli)
cli.add_typer(models_cli, name="models")
