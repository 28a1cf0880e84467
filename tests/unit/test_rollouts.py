"""Rollouts (flowdesk.models.rollout), on both stores: a new version as a canary (sticky
per routing key) or in shadow beside the current one, read from the model registry for
local models and from the TOML for HTTP ones; promote and rollback picked up within the
TTL in every process; agreement, latency and cost of each version recorded in the store
and reported; route flags from the config, overridden at runtime (``flowdesk models
flag``) for every process, audited.

The registry is the real ``flowdesk.models.registry.Registry`` on a temporary folder, with
two tiny classifiers trained by ``flowdesk.models.training`` registered as v1 and v2. The
model that answers is an in-process `Provider` whose versions differ in a known way (so
agreement is predictable); the gateway, the worker, the store and the CLI (a real
subprocess) are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flowdesk
from flowdesk import errors
from flowdesk.models import base, registry, rollout, training
from flowdesk.models.gateway import sticky_percent

LABELS = ["billing", "refund", "other"]


class Versioned(base.Provider):
    """A local classifier whose versions differ: version v2 calls every text that mentions
    money a refund, v1 calls it billing. Reports one token per word."""

    def __init__(self, name: str, *, external: bool = False) -> None:
        self.name = name
        self.external = external
        self.calls: list[tuple[str | None, str]] = []

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        version = request.version or "?"
        self.calls.append((version, request.text))
        text = request.text.casefold()
        if "money" in text:
            label = "refund" if version == "v2" else "billing"
        else:
            label = next((lab for lab in request.labels if lab in text), "other")
        return base.ProviderResult(
            model=request.model,
            version=version,
            label=label,
            confidence=0.8 if version == "v2" else 0.9,
            tokens_in=len(text.split()),
            tokens_out=1,
        )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def local_config(models_dir: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "providers": {
            "clf": {"type": "local", "task": "ticket", "models_dir": str(models_dir)},
            "backup_p": {"type": "python"},
        },
        "models": {
            "tickets": {"provider": "clf", "model": "ticket-clf", "version": "1"},
            "backup": {"provider": "backup_p", "model": "backup"},
        },
        "tasks": {
            "ticket": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["tickets", "backup"],
                "cache_ttl_s": 0,
            }
        },
        "prices": {"tickets": {"per_call": 0.001}},
    }
    data.update(extra)
    return data


def wire_local(
    app: flowdesk.App, models_dir: Path, clock: Clock, **extra: Any
) -> tuple[rollout.Stack, Versioned]:
    model = Versioned("clf")
    stack = rollout.wire(
        app,
        local_config(models_dir, **extra),
        providers={"clf": model, "backup_p": Versioned("backup_p")},
        clock=clock,
    )
    return stack, model


def seed(models_dir: Path) -> registry.Registry:
    """A registry with two trained versions of ``ticket``: v1 (current) and v2."""
    texts = [f"{word} {i}" for word in ("billing invoice", "money back", "hello") for i in range(8)]
    labels = [label for label in LABELS for _ in range(8)]
    examples = training.Examples(
        texts=tuple(texts),
        labels=tuple(labels),
        path="<test>",
        sha256="-",
        format="csv",
        text_column="text",
        label_column="label",
    )
    models = registry.Registry(models_dir)
    for seed_ in (1, 2):
        result = training.train(examples, features="tfidf", seed=seed_)
        models.register("ticket", result.classifier, result.meta)
    assert models.state("ticket").current == "v1"
    return models


# -- 1. canary: sticky per key, from the registry -----------------------------------------------


async def test_a_canary_from_the_registry_answers_for_its_share_of_keys_sticky_per_key(
    app, tmp_path
):
    registry = seed(tmp_path / "models")
    registry.set_canary("ticket", "v2", 30.0)
    clock = Clock()
    stack, model = wire_local(app, tmp_path / "models", clock)
    keys = [f"customer-{i}" for i in range(200)]
    expected = {k for k in keys if sticky_percent("ticket", "tickets", k) < 30.0}
    async with app:
        first = [await stack.gateway.ask("ticket", "money back", {"key": k}) for k in keys]
        again = [await stack.gateway.ask("ticket", "money back", {"key": k}) for k in keys]
        await stack.flush()
        report = await stack.rollouts.report("ticket")
    await stack.close()

    assert 40 <= len(expected) <= 80  # about 30% of 200 keys
    canary = {k for k, a in zip(keys, first, strict=True) if a.canary}
    assert canary == expected
    assert all(a.version == ("v2" if a.canary else "v1") for a in first)
    assert [a.version for a in again] == [a.version for a in first]  # sticky per key
    assert {a.label for a in first if a.canary} == {"refund"}
    assert {a.label for a in first if not a.canary} == {"billing"}
    rows = {(v["version"], v["role"]): v for v in report["versions"]}
    assert rows[("v2", "canary")]["calls"] == 2 * len(expected)
    assert rows[("v1", "current")]["calls"] == 2 * (200 - len(expected))
    assert rows[("v2", "canary")]["cost_usd"] == pytest.approx(0.001 * 2 * len(expected))
    assert rows[("v2", "canary")]["confidence_avg"] == 0.8
    assert rows[("v1", "current")]["confidence_avg"] == 0.9
    assert rows[("v2", "canary")]["latency_ms_avg"] >= 0
    assert report["in_force"]["tickets"] == {
        "current": "v1",
        "canary": {"version": "v2", "percent": 30.0},
        "shadow": None,
        "source": "registry",
    }


# -- 2. promote and rollback, picked up within the TTL -------------------------------------------


async def test_promote_and_rollback_reach_every_process_within_the_ttl(make_app, tmp_path):
    """``flowdesk models promote`` and ``rollback`` (real subprocesses) change the
    registry; both apps answer with the new version once the TTL has passed."""
    seed(tmp_path / "models")
    clock = Clock()
    apps = [make_app(), make_app()]
    stacks = [wire_local(a, tmp_path / "models", clock)[0] for a in apps]

    async def versions() -> list[str]:
        return [(await s.gateway.ask("ticket", "money")).version for s in stacks]

    def registry_cli(*args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
        done = subprocess.run(
            [sys.executable, "-m", "flowdesk", "models", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "FLOWDESK_MODELS_DIR": str(tmp_path / "models")},
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    for a in apps:
        await a.open()
    try:
        assert await versions() == ["v1", "v1"]
        await asyncio.to_thread(registry_cli, "promote", "ticket", "v2")
        assert await versions() == ["v1", "v1"]  # within the TTL, the state read before
        clock.now += 1.01
        assert await versions() == ["v2", "v2"]
        await asyncio.to_thread(registry_cli, "rollback", "ticket")
        clock.now += 1.01
        assert await versions() == ["v1", "v1"]
    finally:
        for a, s in zip(apps, stacks, strict=True):
            await s.close()
            await a.close()


async def test_the_real_local_classifier_answers_with_the_version_the_policy_chose(app, tmp_path):
    """`flowdesk.models.local.LocalClassifierProvider` on the registry: the shadow and the
    promoted version the policy reads from the registry are the ones its classifiers
    answer with."""
    from flowdesk.models import local

    models = seed(tmp_path / "models")
    models.set_shadow("ticket", "v2")
    clock = Clock()
    classifier = local.LocalClassifierProvider(registry.Registry(tmp_path / "models"))
    stack = rollout.wire(
        app,
        local_config(tmp_path / "models"),
        providers={"clf": classifier, "backup_p": Versioned("backup_p")},
        clock=clock,
    )
    async with app:
        first = await stack.gateway.ask("ticket", "billing invoice 3")
        models.promote("ticket", "v2")
        clock.now += 1.01
        second = await stack.gateway.ask("ticket", "billing invoice 3")
        await stack.flush()
        report = await stack.rollouts.report("ticket")
    await stack.close()
    assert (first.version, first.provider, first.label) == ("v1", "clf", "billing")
    assert first.shadow is not None and first.shadow["version"] == "v2"
    assert first.shadow["agree"] is True
    assert (second.version, second.shadow) == ("v2", None)  # promoting ends its shadow
    [shadow] = report["shadow"]
    assert (shadow["version"], shadow["shadow_version"], shadow["agreed"]) == ("v1", "v2", 1)


# -- 3. shadow: agreement, latency and cost of both --------------------------------------------


async def test_a_shadow_version_answers_beside_and_its_agreement_latency_and_cost_are_stored(
    app, tmp_path, query, wait_status
):
    registry = seed(tmp_path / "models")
    registry.set_shadow("ticket", "v2")
    stack, model = wire_local(app, tmp_path / "models", Clock())

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        answer = await ctx.model("ticket", text)
        return {"label": answer.label, "shadow": answer.shadow, "cost": answer.cost_usd}

    texts = ["money please"] * 3 + ["billing question"] * 5 + ["hello there"] * 2
    async with app, app.worker():
        handles = [await app.start("triage", {"text": t}) for t in texts]
        results = [await h.result(timeout=30) for h in handles]
        await stack.flush()
        report = await stack.rollouts.report("ticket")
    await stack.close()

    # The current version answers; the shadow's answer is beside it, never instead.
    assert [r["label"] for r in results] == ["billing"] * 8 + ["other"] * 2
    assert [r["shadow"]["agree"] for r in results] == [False] * 3 + [True] * 7
    assert all(r["cost"] == pytest.approx(0.002) for r in results)  # both calls are paid
    assert sorted(v for v, _ in model.calls) == ["v1"] * 10 + ["v2"] * 10
    [shadow] = report["shadow"]
    assert (shadow["version"], shadow["shadow_version"]) == ("v1", "v2")
    assert (shadow["samples"], shadow["compared"], shadow["agreed"]) == (10, 10, 7)
    assert shadow["agreement"] == 0.7 and shadow["shadow_errors"] == 0
    assert (shadow["confidence_avg"], shadow["shadow_confidence_avg"]) == (0.9, 0.8)
    assert shadow["shadow_latency_ms_avg"] >= 0
    rows = {(v["version"], v["role"]): v for v in report["versions"]}
    assert rows[("v1", "current")]["calls"] == rows[("v2", "shadow")]["calls"] == 10
    assert rows[("v2", "shadow")]["cost_usd"] == pytest.approx(0.01)
    # Queryable in the store, per run and step.
    stored = query(
        "SELECT run_id, seq, version, shadow_version, agree FROM model_shadow_samples ORDER BY id"
    )
    assert {(r[0], r[1]) for r in stored} == {(h.id, 1) for h in handles}
    assert sum(1 for r in stored if r[4] == 1) == 7


async def test_a_failing_shadow_is_recorded_as_an_error_and_the_answer_stands(app, tmp_path):
    registry = seed(tmp_path / "models")
    registry.set_shadow("ticket", "v2")
    stack, model = wire_local(app, tmp_path / "models", Clock())
    real = model.infer

    async def broken(request: base.ModelRequest) -> base.ProviderResult:
        if request.version == "v2":
            raise errors.BadModelAnswer("the shadow's output does not parse")
        return await real(request)

    model.infer = broken  # type: ignore[method-assign]
    async with app:
        answer = await stack.gateway.ask("ticket", "billing")
        await stack.flush()
        report = await stack.rollouts.report("ticket")
    await stack.close()
    assert answer.label == "billing" and answer.shadow is not None
    assert answer.shadow["error"] == "BadModelAnswer"
    [shadow] = report["shadow"]
    assert (shadow["samples"], shadow["compared"], shadow["shadow_errors"]) == (1, 0, 1)
    assert shadow["agreement"] is None


# -- 4. HTTP models: the TOML decides -------------------------------------------------------


async def test_http_models_take_canary_and_shadow_from_the_toml(app):
    data = {
        "providers": {"api": {"type": "python"}},
        "models": {
            "small": {
                "provider": "api",
                "model": "gpt-small",
                "version": "1",
                "canary_version": "2",
                "canary_percent": 50,
                "shadow_version": "3",
            }
        },
        "tasks": {
            "ticket": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["small"],
                "cache_ttl_s": 0,
            }
        },
    }
    api = Versioned("api", external=True)
    stack = rollout.wire(app, data, providers={"api": api})
    keys = [f"k{i}" for i in range(40)]
    async with app:
        answers = [await stack.gateway.ask("ticket", "billing", {"key": k}) for k in keys]
        await stack.flush()
        report = await stack.rollouts.report("ticket")
    await stack.close()
    canary = {k for k, a in zip(keys, answers, strict=True) if a.canary}
    assert canary == {k for k in keys if sticky_percent("ticket", "small", k) < 50}
    assert all(a.shadow is not None and a.shadow["version"] == "3" for a in answers)
    assert report["in_force"]["small"]["source"] == "config"
    [shadow_row] = [v for v in report["versions"] if v["role"] == "shadow"]
    assert (shadow_row["version"], shadow_row["calls"]) == ("3", 40)


# -- 5. flags --------------------------------------------------------------------------------


def flowdesk_cli(db_url: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
    return subprocess.run(
        [sys.executable, "-m", "flowdesk", "models", *args, "--database-url", db_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
        check=False,
    )


async def test_route_flags_from_the_config_and_runtime_overrides_reach_every_process(
    make_app, db_url, tmp_path, query
):
    registry = seed(tmp_path / "models")
    registry.set_shadow("ticket", "v2")
    flags = {"ticket": {"tickets": False}}  # the config takes the local model out
    clock = Clock()
    apps = [make_app(), make_app()]
    stacks = [wire_local(a, tmp_path / "models", clock, flags=flags)[0] for a in apps]
    config_file = tmp_path / "models.toml"
    config_file.write_text(
        "[providers.clf]\ntype = 'local'\ntask = 'ticket'\n"
        f"models_dir = '{tmp_path / 'models'}'\n"
        "[providers.backup_p]\ntype = 'python'\n"
        "[models.tickets]\nprovider = 'clf'\nmodel = 'ticket-clf'\n"
        "[models.backup]\nprovider = 'backup_p'\nmodel = 'backup'\n"
        "[tasks.ticket]\ncapability = 'classify'\nlabels = ['billing', 'refund', 'other']\n"
        "chain = ['tickets', 'backup']\n"
        "[flags.ticket]\ntickets = false\n"
    )

    async def providers() -> list[str]:
        return [(await s.gateway.ask("ticket", "billing")).provider for s in stacks]

    for a in apps:
        await a.open()
    try:
        assert await providers() == ["backup_p", "backup_p"]
        done = await asyncio.to_thread(
            flowdesk_cli,
            db_url,
            tmp_path,
            "flag",
            "ticket",
            "tickets",
            "on",
            "--config",
            str(config_file),
        )
        assert done.returncode == 0, done.stderr
        assert await providers() == ["backup_p", "backup_p"]  # within the TTL
        clock.now += 1.01
        assert await providers() == ["clf", "clf"]  # the override wins, in both apps
        answer = await stacks[0].gateway.ask("ticket", "money")
        assert answer.shadow is not None  # the shadow runs by default
        await stacks[0].rollouts.set_flag("ticket", "shadow", False, actor="alice")
        clock.now += 1.01
        assert (await stacks[1].gateway.ask("ticket", "money")).shadow is None
        views = {(v.route, v.source, v.enabled) for v in await stacks[1].rollouts.flags()}
        assert views == {
            ("tickets", "override", True),
            ("backup", "default", True),
            ("canary", "default", True),
            ("shadow", "override", False),
        }
        listed = await asyncio.to_thread(
            flowdesk_cli, db_url, tmp_path, "flags", "--config", str(config_file), "--json"
        )
        assert listed.returncode == 0, listed.stderr
        assert {(f["route"], f["enabled"], f["source"]) for f in json.loads(listed.stdout)} == {
            ("tickets", True, "override"),
            ("backup", True, "default"),
            ("canary", True, "default"),
            ("shadow", False, "override"),
        }
        cleared = await asyncio.to_thread(
            flowdesk_cli, db_url, tmp_path, "flag", "ticket", "tickets", "clear"
        )
        assert cleared.returncode == 0, cleared.stderr
        clock.now += 1.01
        assert await providers() == ["backup_p", "backup_p"]  # the config decides again
        bad = await asyncio.to_thread(
            flowdesk_cli,
            db_url,
            tmp_path,
            "flag",
            "ticket",
            "nope",
            "off",
            "--config",
            str(config_file),
        )
        assert bad.returncode == 1 and "'nope' is not a route of task 'ticket'" in bad.stderr
    finally:
        for a, s in zip(apps, stacks, strict=True):
            await s.close()
            await a.close()
    audited = query(
        "SELECT actor, action, subject FROM audit WHERE action LIKE 'model.flag%' ORDER BY seq"
    )
    assert [(a, s) for _, a, s in audited] == [
        ("model.flag_set", "model-task:ticket"),
        ("model.flag_set", "model-task:ticket"),
        ("model.flag_cleared", "model-task:ticket"),
    ]
    assert audited[1][0] == "alice"


async def test_a_flag_that_takes_out_every_model_leaves_no_eligible_model(app, tmp_path):
    seed(tmp_path / "models")
    flags = {"ticket": {"tickets": False, "backup": False}}
    stack, model = wire_local(app, tmp_path / "models", Clock(), flags=flags)
    async with app:
        with pytest.raises(errors.ModelError, match="switched off by a flag"):
            await stack.gateway.ask("ticket", "billing")
    await stack.close()
    assert model.calls == []


def test_flags_naming_unknown_tasks_or_routes_are_configuration_errors(tmp_path):
    with pytest.raises(errors.ConfigurationError, match=r"\[flags.nope\]: no such task"):
        rollout.parse(local_config(tmp_path, flags={"nope": {"x": True}}))
    with pytest.raises(errors.ConfigurationError, match="'x' is not a route of the task"):
        rollout.parse(local_config(tmp_path, flags={"ticket": {"x": True}}))
    config, _ = rollout.parse(local_config(tmp_path))
    assert rollout.routes_of(config, "ticket") == ["tickets", "backup", "canary", "shadow"]


def test_a_registry_state_reads_as_mapping_or_object():
    class Canary:
        version = "5"
        percent = 12.5

    class State:
        current = "4"
        canary = Canary()
        shadow = None

    assert rollout.state_from_registry(State(), "1") == rollout.RolloutState(
        current="4", canary_version="5", canary_percent=12.5, source="registry"
    )
    assert rollout.state_from_registry(
        {"current": None, "canary": None, "shadow": {"version": "9"}}, "1"
    ) == rollout.RolloutState(current="1", shadow_version="9", source="registry")
    real = registry.TaskState(
        task="ticket", current="v3", canary=registry.Canary(version="v4", percent=5), shadow="v5"
    )
    assert rollout.state_from_registry(real, "1") == rollout.RolloutState(
        current="v3",
        canary_version="v4",
        canary_percent=5.0,
        shadow_version="v5",
        source="registry",
    )


# -- a `type = "local"` provider built from the TOML config ---------------------------------------


async def test_a_local_provider_named_in_the_toml_config_answers(tmp_path):
    from flowdesk.models.gateway import Gateway

    seed(tmp_path / "models")
    config = tmp_path / "models.toml"
    config.write_text(
        f"""
[providers.tickets_local]
type = "local"
task = "ticket"
models_dir = "{tmp_path / "models"}"

[models.local_tickets]
provider = "tickets_local"
model = "ticket"
capabilities = ["classify"]

[tasks.triage]
capability = "classify"
labels = {LABELS!r}
chain = ["local_tickets"]
""".replace("'", '"')
    )
    gateway = Gateway.from_toml(config)
    try:
        answer = await gateway.ask("triage", "billing invoice 3")
    finally:
        await gateway.close()
    assert answer.label == "billing"
    assert answer.version == "v1"
    assert answer.provider == "tickets_local"
