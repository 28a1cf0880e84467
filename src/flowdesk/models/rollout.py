"""Rollouts: which version of a model answers, route flags, shadow comparisons, and the
wiring of the gateway's second half (`wire`).

`Rollouts` plugs into the gateway three ways:

* as its `VersionPolicy` (``choose``): for a model on a ``type = "local"`` provider the
  versions come from the model registry of the provider's ``models_dir``
  (``flowdesk.models.registry.Registry(path).state(task)``: ``current``, ``canary``
  ``{version, percent}``, ``shadow`` ``{version}``), so ``flowdesk models promote`` and
  ``rollback`` take effect within ``ttl_s`` (1 s by default) in every process, without a
  restart; for an HTTP model they come from its ``[models.NAME]`` entry (``version``,
  ``canary_version``/``canary_percent``, ``shadow_version``). A canary answers for
  ``percent`` of routing keys, sticky per key (`gateway.sticky_percent`); a shadow answers
  beside the chosen version and is only compared;
* as an interceptor: a route a flag switched off is refused (`NoEligibleModel`: the
  gateway moves down the chain), and the two answers of a shadowed call are paired and
  recorded in ``model_shadow_samples`` (agreement, both confidences, the shadow's latency
  and error). The ledger (`flowdesk.models.ledger`) records the latency, cost and
  confidence of every call with its role (current, canary, shadow), so `report` compares
  the versions side by side;
* through flags. A task's routes are the models of its chains, plus ``canary`` and
  ``shadow``. ``[flags.TASK]`` in the TOML sets them (``small = false`` takes model
  ``small`` out of the task's chains; ``shadow = false`` stops its shadows); a runtime
  override in the store (``flowdesk models flag TASK ROUTE on|off|clear``, audited) wins
  over the config and reaches every process within ``ttl_s``.

`wire(app, "models.toml")` builds the whole stack from one TOML file (the gateway's tables
plus ``[prices]``, ``[[budgets]]``, ``[[limits]]``, ``[flags]`` and ``[drift]``), installs
the gateway on the app, and registers the drift check as an upkeep hook.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flowdesk import errors
from flowdesk.models import base, budgets, drift, ledger
from flowdesk.models import config as cfg
from flowdesk.models.gateway import (
    CallNext,
    CallOutcome,
    Gateway,
    ModelCall,
    VersionChoice,
    VersionQuery,
    sticky_percent,
)
from flowdesk.store import base as store_base
from flowdesk.store import sql_models

if TYPE_CHECKING:
    from flowdesk.engine.app import App

log = logging.getLogger("flowdesk.models.rollout")

SPECIAL_ROUTES = ("canary", "shadow")

# Module-level names for the classes of the tables and parts below: fields of `Settings`
# and `Stack` carry the modules' own names.
_Price = ledger.Price
_Budget = budgets.Budget
_RateLimit = budgets.RateLimit
_DriftSettings = drift.DriftSettings
_Ledger = ledger.Ledger
_Budgets = budgets.Budgets
_DriftMonitor = drift.DriftMonitor


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutState:
    """The versions of one model in force now, and where they came from."""

    current: str
    canary_version: str | None = None
    canary_percent: float = 0.0
    shadow_version: str | None = None
    source: Literal["registry", "config"] = "config"


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def state_from_registry(raw: Any, fallback: str) -> RolloutState:
    """A registry's ``state(task)`` (``flowdesk.models.registry.TaskState``, or its JSON:
    ``current``, ``canary`` ``{version, percent}``, ``shadow`` as a version or
    ``{version}``) as a `RolloutState`."""
    canary = _field(raw, "canary")
    shadow = _field(raw, "shadow")
    canary_version = _field(canary, "version")
    percent = _field(canary, "percent")
    shadow_version = shadow if isinstance(shadow, str) else _field(shadow, "version")
    current = _field(raw, "current")
    return RolloutState(
        current=str(current) if current else fallback,
        canary_version=str(canary_version) if canary_version else None,
        canary_percent=float(percent or 0.0) if canary_version else 0.0,
        shadow_version=str(shadow_version) if shadow_version else None,
        source="registry",
    )


def _default_registry(models_dir: str) -> Any:
    # Imported on use: the registry brings scikit-learn and joblib with it.
    module = importlib.import_module("flowdesk.models.registry")
    return module.Registry(models_dir)


@dataclass(slots=True)
class _Pair:
    """The two answers of one shadowed call, filled in as each arrives."""

    task: str
    model: str
    version: str
    shadow_version: str
    main: base.ProviderResult | None = None
    shadow: base.ProviderResult | None = None
    shadow_latency_ms: float | None = None
    shadow_error: str | None = None
    run_id: str | None = None
    seq: int | None = None
    done: set[str] = field(default_factory=set)


# Set by `Rollouts.choose` in the caller's context just before the gateway starts the
# shadow call (whose task copies the context): the main call and its shadow share it.
_PAIR: contextvars.ContextVar[_Pair | None] = contextvars.ContextVar(
    "flowdesk_shadow_pair", default=None
)


def routes_of(config: cfg.GatewayConfig, task: str) -> list[str]:
    """The routes of a task that flags switch: its models (every chain), then the
    special routes ``canary`` and ``shadow``."""
    tcfg = config.tasks[task]
    models: list[str] = []
    for chain in [tcfg.chain, *(r.chain for r in tcfg.routes)]:
        models += [m for m in chain if m not in models]
    return [*models, *SPECIAL_ROUTES]


def check_flags(config: cfg.GatewayConfig, flags: Mapping[str, Mapping[str, bool]]) -> None:
    for task, routes in flags.items():
        if task not in config.tasks:
            raise errors.ConfigurationError(
                f"[flags.{task}]: no such task (tasks: {', '.join(sorted(config.tasks))})."
            )
        known = routes_of(config, task)
        for route in routes:
            if route not in known:
                raise errors.ConfigurationError(
                    f"[flags.{task}]: {route!r} is not a route of the task; its routes are "
                    f"{', '.join(known)}."
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class FlagView:
    """A route's effective switch and why: the store's override, the config, or the
    default (on)."""

    task: str
    route: str
    enabled: bool
    source: Literal["override", "config", "default"]
    actor: str | None = None
    updated_at: int | None = None


class Rollouts:
    """Version policy, route flags and shadow comparisons (see the module docstring).

    ``registry(models_dir)`` returns the model registry of a local provider (default:
    ``flowdesk.models.registry.Registry``); ``ttl_s`` bounds how stale a registry state
    or a flag may be (0: read on every call)."""

    def __init__(
        self,
        app: App,
        config: cfg.GatewayConfig,
        *,
        flags: Mapping[str, Mapping[str, bool]] | None = None,
        registry: Callable[[str], Any] | None = None,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_flags(config, flags or {})
        self.app = app
        self.config = config
        self.config_flags = {t: dict(r) for t, r in (flags or {}).items()}
        self.ttl_s = ttl_s
        self.writes = ledger.Writes(app)
        self._registry_factory = registry or _default_registry
        self._states: dict[tuple[str, str], tuple[float, RolloutState]] = {}
        self._overrides: dict[tuple[str, str], sql_models.FlagRecord] = {}
        self._overrides_at = -float("inf")
        self._overrides_lock = asyncio.Lock()
        self._clock = clock
        self._warned: set[str] = set()

    # -- versions ------------------------------------------------------------------------
    def state(self, model: str) -> RolloutState:
        """The versions of ``model`` (a ``[models.NAME]``) in force now."""
        spec = self.config.models[model]
        provider = self.config.providers[spec.provider]
        if provider.type != "local" or not provider.models_dir or not provider.task:
            return RolloutState(
                current=spec.current_version,
                canary_version=spec.canary_version,
                canary_percent=spec.canary_percent,
                shadow_version=spec.shadow_version,
            )
        key = (provider.models_dir, provider.task)
        now = self._clock()
        cached = self._states.get(key)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        state = self._read_registry(provider.models_dir, provider.task, spec)
        self._states[key] = (now, state)
        return state

    def _read_registry(self, models_dir: str, task: str, spec: cfg.ModelConfig) -> RolloutState:
        try:
            # A new registry object each time: one that keeps its state in memory would
            # never see a promote made by another process.
            registry = self._registry_factory(models_dir)
            return state_from_registry(registry.state(task), spec.current_version)
        except Exception as exc:
            if models_dir not in self._warned:
                self._warned.add(models_dir)
                log.warning(
                    "model registry at %s has no state for task %s (%s: %s); using the "
                    "config's versions",
                    models_dir,
                    task,
                    type(exc).__name__,
                    exc,
                )
            return RolloutState(
                current=spec.current_version,
                canary_version=spec.canary_version,
                canary_percent=spec.canary_percent,
                shadow_version=spec.shadow_version,
            )

    async def choose(self, query: VersionQuery) -> VersionChoice:
        state = self.state(query.model)
        version, canary = state.current, False
        if (
            state.canary_version
            and state.canary_percent > 0
            and state.canary_version != state.current
            and await self.enabled(query.task, "canary")
            and sticky_percent(query.task, query.model, query.key) < state.canary_percent
        ):
            version, canary = state.canary_version, True
        shadow = state.shadow_version
        if shadow is not None and (
            shadow == version or not await self.enabled(query.task, "shadow")
        ):
            shadow = None
        _PAIR.set(None if shadow is None else _Pair(query.task, query.model, version, shadow))
        return VersionChoice(version=version, canary=canary, shadow_version=shadow)

    # -- flags ---------------------------------------------------------------------------
    async def _load_overrides(self) -> dict[tuple[str, str], sql_models.FlagRecord]:
        if self._clock() - self._overrides_at < self.ttl_s:
            return self._overrides
        async with self._overrides_lock:
            if self._clock() - self._overrides_at >= self.ttl_s:
                await self.app.open()
                rows = await sql_models.models_store(self.app.store).model_flags()
                self._overrides = {(r.task, r.route): r for r in rows}
                self._overrides_at = self._clock()
        return self._overrides

    async def enabled(self, task: str, route: str) -> bool:
        override = (await self._load_overrides()).get((task, route))
        if override is not None:
            return override.enabled
        return self.config_flags.get(task, {}).get(route, True)

    async def flags(self, task: str | None = None) -> list[FlagView]:
        """The effective switch of every route (of one task, or of all)."""
        self._overrides_at = -float("inf")
        overrides = await self._load_overrides()
        views: list[FlagView] = []
        for name in sorted(self.config.tasks) if task is None else [task]:
            for route in routes_of(self.config, name):
                found = overrides.get((name, route))
                if found is not None:
                    views.append(
                        FlagView(
                            task=name,
                            route=route,
                            enabled=found.enabled,
                            source="override",
                            actor=found.actor,
                            updated_at=found.updated_at,
                        )
                    )
                elif route in self.config_flags.get(name, {}):
                    views.append(
                        FlagView(
                            task=name,
                            route=route,
                            enabled=self.config_flags[name][route],
                            source="config",
                        )
                    )
                else:
                    views.append(FlagView(task=name, route=route, enabled=True, source="default"))
        return views

    async def set_flag(
        self, task: str, route: str, enabled: bool | None, actor: str | None = None
    ) -> None:
        """Switch a route on or off in every process (None: back to the config)."""
        await set_flag(self.app, task, route, enabled, actor=actor, config=self.config)
        self._overrides_at = -float("inf")

    # -- the interceptor: flags, and the pairing of shadow answers -------------------------
    async def __call__(self, call: ModelCall, next: CallNext) -> CallOutcome:
        if not await self.enabled(call.task, call.model):
            raise errors.NoEligibleModel(
                call.task, {call.model: "switched off by a flag (flowdesk models flag)"}
            )
        pair = _PAIR.get()
        if pair is None or (pair.task, pair.model) != (call.task, call.model):
            return await next(call)
        side = "shadow" if call.shadow else "main"
        if side in pair.done:  # not this choice's call (cannot happen in one gateway)
            return await next(call)
        pair.done.add(side)
        pair.run_id, pair.seq = call.run_id, call.seq
        try:
            outcome = await next(call)
        except errors.ModelError as exc:
            if side == "main":
                pair.done.add("failed")  # no answer to compare with
                raise
            pair.shadow_error = type(exc).__name__
            self._complete(pair)
            raise
        if side == "main":
            pair.main = outcome.result
        else:
            pair.shadow = outcome.result
            pair.shadow_latency_ms = round(outcome.latency_ms, 3)
        self._complete(pair)
        return outcome

    def _complete(self, pair: _Pair) -> None:
        if pair.main is None or "shadow" not in pair.done or "failed" in pair.done:
            return
        if pair.shadow is None and pair.shadow_error is None:
            return
        if "recorded" in pair.done:
            return
        pair.done.add("recorded")
        main, other = pair.main, pair.shadow
        agree: bool | None = None
        if other is not None:
            if main.label is not None:
                agree = other.label == main.label
            elif main.text is not None:
                agree = other.text == main.text
        sample = sql_models.ShadowSample(
            at=store_base.now_ms(),
            run_id=pair.run_id,
            seq=pair.seq,
            task=pair.task,
            model=pair.model,
            version=main.version,
            shadow_version=other.version if other is not None else pair.shadow_version,
            agree=agree,
            confidence=main.confidence,
            shadow_confidence=None if other is None else other.confidence,
            shadow_latency_ms=pair.shadow_latency_ms,
            shadow_error=pair.shadow_error,
        )

        async def op(tx: store_base.Tx) -> None:
            await sql_models.models_tx(tx).record_shadow_samples([sample])

        self.writes.submit(op, f"a shadow comparison of task {pair.task!r}")

    # -- reporting -----------------------------------------------------------------------
    async def report(self, task: str, *, since: int | None = None) -> dict[str, Any]:
        """Versions in force per model of the task, and what the store recorded about
        each version: calls, errors, latency, cost, confidence by role; shadow agreement."""
        return await rollout_report(self.app, task, since=since, rollouts=self)


async def set_flag(
    app: App,
    task: str,
    route: str,
    enabled: bool | None,
    *,
    actor: str | None = None,
    config: cfg.GatewayConfig | None = None,
) -> None:
    """Store a runtime override of a task's route (None drops it); audited. With
    ``config``, the task and route are checked against it."""
    if config is not None:
        if task not in config.tasks:
            raise errors.UnknownModelTask(task, list(config.tasks))
        known = routes_of(config, task)
        if route not in known:
            raise errors.ConfigurationError(
                f"{route!r} is not a route of task {task!r}; its routes are {', '.join(known)}."
            )
    if not task or not route:
        raise errors.ConfigurationError("A flag needs a task and a route.")

    async def op(tx: store_base.Tx) -> None:
        await sql_models.models_tx(tx).set_model_flag(task, route, enabled)

    await app.submit(op, actor=actor)


async def rollout_report(
    app: App, task: str, *, since: int | None = None, rollouts: Rollouts | None = None
) -> dict[str, Any]:
    """What the store recorded about each version of a task's models (see
    `Rollouts.report`); with ``rollouts``, the versions in force too."""
    await app.open()
    store = sql_models.models_store(app.store)
    versions = await store.version_stats(task, since=since)
    shadows = await store.shadow_stats(task, since=since)
    report: dict[str, Any] = {
        "task": task,
        "versions": [
            {
                "model": v.model,
                "version": v.version,
                "role": v.role,
                "calls": v.calls,
                "errors": v.errors,
                "latency_ms_avg": round(v.latency_ms_avg, 3),
                "latency_ms_max": round(v.latency_ms_max, 3),
                "cost_usd": round(v.cost_usd, 9),
                "cost_usd_avg": round(v.cost_usd_avg, 9),
                "confidence_avg": None if v.confidence_avg is None else round(v.confidence_avg, 4),
            }
            for v in versions
        ],
        "shadow": [
            {
                "model": s.model,
                "version": s.version,
                "shadow_version": s.shadow_version,
                "samples": s.samples,
                "compared": s.compared,
                "agreed": s.agreed,
                "agreement": None if s.agreement is None else round(s.agreement, 4),
                "shadow_errors": s.shadow_errors,
                "shadow_latency_ms_avg": (
                    None if s.shadow_latency_ms_avg is None else round(s.shadow_latency_ms_avg, 3)
                ),
                "confidence_avg": None if s.confidence_avg is None else round(s.confidence_avg, 4),
                "shadow_confidence_avg": (
                    None if s.shadow_confidence_avg is None else round(s.shadow_confidence_avg, 4)
                ),
            }
            for s in shadows
        ],
    }
    if rollouts is not None and task in rollouts.config.tasks:
        in_force = {}
        for model in routes_of(rollouts.config, task)[: -len(SPECIAL_ROUTES)]:
            state = rollouts.state(model)
            in_force[model] = {
                "current": state.current,
                "canary": (
                    {"version": state.canary_version, "percent": state.canary_percent}
                    if state.canary_version
                    else None
                ),
                "shadow": state.shadow_version,
                "source": state.source,
            }
        report["in_force"] = in_force
    return report


# -- wiring -----------------------------------------------------------------------------


class Settings(BaseModel):
    """The tables this half reads from the gateway's TOML (the rest is `config`'s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prices: dict[str, _Price] = Field(default_factory=dict)
    budgets: list[_Budget] = Field(default_factory=list)
    limits: list[_RateLimit] = Field(default_factory=list)
    flags: dict[str, dict[str, bool]] = Field(default_factory=dict)
    drift: _DriftSettings = Field(default_factory=_DriftSettings)


EXTRA_TABLES = frozenset(Settings.model_fields)


def parse(
    data: Mapping[str, Any], source: str = "gateway config"
) -> tuple[cfg.GatewayConfig, Settings]:
    """Split a parsed TOML mapping into the gateway's config and these `Settings`, both
    validated (cross references included); mistakes are one `ConfigurationError`."""
    core = {k: v for k, v in data.items() if k not in EXTRA_TABLES}
    extra = {k: v for k, v in data.items() if k in EXTRA_TABLES}
    config = cfg.GatewayConfig.parse(core, source)
    try:
        settings = Settings.model_validate(extra)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise errors.ConfigurationError(f"Invalid {source}: {problems}") from None
    for model in settings.prices:
        if model not in config.models:
            raise errors.ConfigurationError(
                f"Invalid {source}: [prices.{model}] names no model (models: "
                f"{', '.join(sorted(config.models))})."
            )
    for i, budget in enumerate(settings.budgets):
        if budget.scope == "task" and budget.name not in ("*", *config.tasks):
            raise errors.ConfigurationError(
                f"Invalid {source}: budgets[{i}] names task {budget.name!r}, which is not "
                f"configured (tasks: {', '.join(sorted(config.tasks))})."
            )
        if budget.scope == "model" and budget.name not in ("*", *config.models):
            raise errors.ConfigurationError(
                f"Invalid {source}: budgets[{i}] names model {budget.name!r}, which is not "
                "configured."
            )
    for i, limit in enumerate(settings.limits):
        names: dict[str, list[str]] = {
            "task": list(config.tasks),
            "model": list(config.models),
            "provider": list(config.providers),
        }
        pool = names.get(limit.scope)
        if pool is not None and limit.name not in ("*", *pool):
            raise errors.ConfigurationError(
                f"Invalid {source}: limits[{i}] names {limit.scope} {limit.name!r}, which is "
                "not configured."
            )
    for task in settings.drift.tasks or []:
        if task not in config.tasks:
            raise errors.ConfigurationError(
                f"Invalid {source}: [drift] tasks names {task!r}, which is not configured."
            )
    try:
        check_flags(config, settings.flags)
    except errors.ConfigurationError as exc:
        raise errors.ConfigurationError(f"Invalid {source}: {exc.message}") from None
    return config, settings


def read_toml(path: str | os.PathLike[str]) -> tuple[cfg.GatewayConfig, Settings]:
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.ConfigurationError(f"No gateway config file at {file}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigurationError(f"{file} is not valid TOML: {exc}") from None
    return parse(data, str(file))


@dataclass(frozen=True, slots=True)
class Stack:
    """Everything `wire` built, installed on the app."""

    gateway: Gateway
    settings: Settings
    ledger: _Ledger
    budgets: _Budgets
    rollouts: Rollouts
    drift: _DriftMonitor

    async def flush(self) -> None:
        """Wait for the usage, spend, comparison and drift writes still in flight."""
        await self.budgets.settlements.flush()
        await self.drift.samples.flush()
        await self.rollouts.writes.flush()
        await self.ledger.writes.flush()

    async def close(self) -> None:
        await self.flush()
        await self.gateway.close()


def wire(
    app: App,
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    registry: Callable[[str], Any] | None = None,
    ttl_s: float = 1.0,
    metrics: bool = True,
    **gateway_kwargs: Any,
) -> Stack:
    """Build the gateway with prices, budgets, shared limits, rollouts and drift from one
    TOML file (or its parsed mapping), set it as ``app.gateway``, and add the drift
    check to ``app.upkeep_hooks``. ``gateway_kwargs`` go to `Gateway` (``providers``,
    ``env``, ``cache_backend``, ``clock``...; the clock also times the ``ttl_s`` of
    registry states and flags); extra ``interceptors`` run after flags and before
    budgets, extra ``observers`` after drift."""
    if isinstance(source, Mapping):
        config, settings = parse(source)
    else:
        config, settings = read_toml(source)
    prices = ledger.Prices(settings.prices)
    book = ledger.Ledger(app, prices, metrics=metrics)
    guard = budgets.Budgets(app, settings.budgets, settings.limits, prices)
    rollouts = Rollouts(
        app,
        config,
        flags=settings.flags,
        registry=registry,
        ttl_s=ttl_s,
        clock=gateway_kwargs.get("clock", time.monotonic),
    )
    monitor = drift.DriftMonitor(app, settings.drift)
    extra_interceptors = list(gateway_kwargs.pop("interceptors", ()))
    extra_observers = list(gateway_kwargs.pop("observers", ()))
    gateway = Gateway(
        config,
        versions=rollouts,
        interceptors=[rollouts, *extra_interceptors, guard, book],
        observers=[monitor.observe, *extra_observers],
        **gateway_kwargs,
    )
    app.gateway = gateway
    app.upkeep_hooks.append(monitor.upkeep)
    return Stack(gateway, settings, book, guard, rollouts, monitor)
