"""The model gateway: ctx.model recorded as a step, routing, data classes, fallbacks,
retries, circuit breaker, rate limits, confidence escalation, PII redaction, caching,
canary and shadow versions, the seams, and bad input.

External providers are the real HTTP providers talking to `ModelServer` (a local server
that speaks the OpenAI-compatible and Anthropic wire protocols, see test_model_http.py);
in-process models are a tiny `Provider` subclass. A fake clock and a recording sleep
drive the breaker, the token bucket, the cache TTL and Retry-After waits, so no test
waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_model_http import API_KEY, ModelServer, Reply

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.models import base, config
from flowdesk.models.gateway import (
    CallNext,
    CallOutcome,
    ConfiguredVersions,
    Gateway,
    ModelCall,
    VersionChoice,
    VersionQuery,
)

ENV = {"TEST_OA_KEY": API_KEY, "TEST_AN_KEY": API_KEY}
CHAT = "/v1/chat/completions"
LABELS = ["billing", "technical", "other"]


class FakeModel(base.Provider):
    """An in-process model: classifies by the first label named in the text, echoes text
    for generation, counts its calls; ``fail`` holds errors to raise first, in order."""

    def __init__(
        self, name: str, *, confidence: float = 0.9, external: bool = False, tokens: int = 10
    ) -> None:
        self.name = name
        self.external = external
        self.confidence = confidence
        self.tokens = tokens
        self.calls: list[base.ModelRequest] = []
        self.fail: list[Exception] = []
        self.fail_always: Exception | None = None

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        self.calls.append(request)
        if self.fail_always is not None:
            raise self.fail_always
        if self.fail:
            raise self.fail.pop(0)
        version = request.version or "v0"
        if request.capability == "classify":
            text = request.text.casefold()
            label = next((lab for lab in request.labels if lab in text), request.labels[-1])
            return base.ProviderResult(
                model=request.model,
                version=version,
                label=label,
                confidence=self.confidence,
                tokens_in=self.tokens,
                tokens_out=2,
            )
        if request.capability == "generate":
            return base.ProviderResult(
                model=request.model, version=version, text="Echo: " + request.text
            )
        return base.ProviderResult(model=request.model, version=version, embedding=[1.0, 0.5])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records each wait the gateway asks for and moves the fake clock instead."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def model_server():
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps(clock: Clock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
async def make_gateway(clock: Clock, sleeps: Sleeps):
    """``make(config_dict, providers={...}, **kwargs)``: a Gateway on the fake clock;
    every one made is closed at the end."""
    made: list[Gateway] = []

    def make(data: dict[str, Any], providers: dict[str, base.Provider] | None = None, **kw: Any):
        kw.setdefault("env", ENV)
        providers = dict(providers or {})
        for name, settings in data["providers"].items():  # in-process models not given
            if settings["type"] == "python":
                providers.setdefault(name, FakeModel(name))
        gw = Gateway(
            config.GatewayConfig.parse(data), providers=providers, clock=clock, sleep=sleeps, **kw
        )
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


def http_providers(server: ModelServer, **oa: Any) -> dict[str, Any]:
    return {
        "oa": {
            "type": "openai",
            "base_url": server.url + "/v1",
            "api_key_env": "TEST_OA_KEY",
            "region": "us",
            "retries": 0,
            "retry_backoff_s": 0.25,
            "logprobs": False,
            **oa,
        },
        "an": {
            "type": "anthropic",
            "base_url": server.url,
            "api_key_env": "TEST_AN_KEY",
            "region": "eu",
            "retries": 0,
        },
        "local": {"type": "python"},
        "backup": {"type": "python"},
    }


MODELS: dict[str, Any] = {
    "oa-small": {
        "provider": "oa",
        "model": "gpt-small",
        "version": "2024-07",
        "capabilities": ["classify", "generate", "embed"],
        "price_in_per_mtok": 0.5,
        "price_out_per_mtok": 1.5,
    },
    "claude": {
        "provider": "an",
        "model": "claude-test",
        "capabilities": ["classify", "generate"],
        "price_in_per_mtok": 3.0,
        "price_out_per_mtok": 15.0,
    },
    "local-clf": {
        "provider": "local",
        "model": "ticket-clf",
        "version": "7",
        "capabilities": ["classify", "generate", "embed"],
    },
    "backup-clf": {"provider": "backup", "model": "backup-clf", "capabilities": ["classify"]},
}


def setup(
    server: ModelServer | None = None,
    *,
    chain: list[str],
    task: dict[str, Any] | None = None,
    tasks: dict[str, Any] | None = None,
    oa: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
    gateway: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config dict with one classify task ``ticket`` (plus ``tasks``)."""
    providers = (
        http_providers(server, **(oa or {}))
        if server is not None
        else {"local": {"type": "python"}, "backup": {"type": "python"}}
    )
    all_models = {
        k: v for k, v in {**MODELS, **(models or {})}.items() if v["provider"] in providers
    }
    return copy.deepcopy(
        {
            "gateway": gateway or {},
            "providers": providers,
            "models": all_models,
            "tasks": {
                "ticket": {
                    "capability": "classify",
                    "labels": LABELS,
                    "chain": chain,
                    **(task or {}),
                },
                **(tasks or {}),
            },
        }
    )


def fakes(**kw: Any) -> tuple[FakeModel, FakeModel, dict[str, base.Provider]]:
    local = FakeModel("local", **kw)
    backup = FakeModel("backup", confidence=0.95)
    return local, backup, {"local": local, "backup": backup}


# -- 1. ctx.model inside real workflows, on both stores -------------------------------------


async def test_ctx_model_is_recorded_as_a_step_and_replay_never_calls_the_model_again(
    app, make_gateway, wait_status
):
    local, _, providers = fakes(confidence=0.87)
    app.gateway = make_gateway(setup(chain=["local-clf"]), providers)
    executions = {"n": 0}

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        executions["n"] += 1
        answer = await ctx.model("ticket", text, risk="low")
        await ctx.wait_signal("go")  # the run parks; the signal replays it from the top
        return {"label": answer.label, "type": type(answer).__name__, "conf": answer.confidence}

    async with app, app.worker():
        handle = await app.start("triage", {"text": "A billing question"})
        await wait_status(app, handle.id, RunStatus.WAITING)
        await app.signal(handle.id, "go")
        result = await app.result(handle.id, timeout=30)
        steps = await app.steps(handle.id)

    assert result == {"label": "billing", "type": "Answer", "conf": 0.87}
    assert executions["n"] == 2 and len(local.calls) == 1  # replayed, not asked again
    step = steps[0]
    assert (step.seq, step.name, step.kind, step.status, step.attempts) == (
        1,
        "model:ticket",
        "step",
        "ok",
        1,
    )
    recorded = base.Answer.model_validate(step.output)
    assert recorded.label == "billing" and recorded.confidence == 0.87
    assert (recorded.model, recorded.version, recorded.provider) == ("ticket-clf", "7", "local")
    assert recorded.latency_ms >= 0 and recorded.tokens_in == 10 and recorded.tokens_out == 2
    assert not (recorded.cached or recorded.fallback or recorded.canary or recorded.escalate)
    assert recorded.shadow is None and recorded.redactions == {}
    assert local.calls[0].hints["risk"] == "low"


async def test_a_failed_model_call_is_the_steps_final_error_and_retry_asks_again(
    app, make_gateway, wait_status
):
    local, _, providers = fakes()
    local.fail_always = errors.ProviderUnavailable("model server down")
    app.gateway = make_gateway(setup(chain=["local-clf"]), providers)

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> str | None:
        answer = await ctx.model("ticket", text)
        return answer.label

    async with app, app.worker():
        handle = await app.start("triage", {"text": "billing"})
        run = await wait_status(app, handle.id, RunStatus.FAILED)
        [step] = await app.steps(handle.id)
        assert (step.status, step.attempts) == ("error", 1)  # no step-level retries on top
        assert step.error is not None and step.error["type"] == "ProviderUnavailable"
        assert "Every model for task 'ticket' failed" in step.error["message"]
        assert run.error is not None and run.error["type"] == "StepFailed"
        assert len(local.calls) == 1 + 2  # the gateway's own retries (retries = 2)
        local.fail_always = None
        await app.retry(handle.id)
        assert await app.result(handle.id, timeout=30) == "billing"
    assert len(local.calls) == 4


async def test_without_a_gateway_ctx_model_is_a_configuration_error(app):
    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context) -> None:
        await ctx.model("ticket", "text")

    async with app, app.worker():
        handle = await app.start("triage")
        with pytest.raises(errors.RunFailed) as failed:
            await app.result(handle.id, timeout=30)
    assert failed.value.error["type"] == "ConfigurationError"
    assert "app.gateway = Gateway.from_toml" in failed.value.error["message"]


RAW = {
    "email": "jane.roe@example.org",
    "phone": "+1 415-555-2671",
    "iban": "DE89 3704 0044 0532 0130 00",
    "card": "4111 1111 1111 1111",
    "us_ssn": "536-90-4399",
}
PII_TEXT = (
    f"Hi, I am Jane ({RAW['email']}, {RAW['phone']}). My card {RAW['card']} was charged "
    f"twice; refund to {RAW['iban']}. SSN {RAW['us_ssn']}. It is a billing problem."
)


async def test_pii_never_reaches_the_external_provider_logs_step_output_or_audit(
    app, make_gateway, model_server, query, caplog
):
    caplog.set_level(logging.DEBUG)
    tasks = {
        "reply": {"capability": "generate", "chain": ["oa-small"], "restore_pii": False},
        "reply_restored": {"capability": "generate", "chain": ["claude"]},
    }
    app.gateway = make_gateway(setup(model_server, chain=["oa-small"], tasks=tasks))

    @app.workflow("support")
    async def support(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        category = await ctx.model("ticket", text)
        draft = await ctx.model("reply", text)
        return {
            "label": category.label,
            "redactions": category.redactions,
            "draft": draft.text,
            "cost": category.cost_usd,
        }

    async with app, app.worker():
        handle = await app.start("support", {"text": PII_TEXT})
        result = await app.result(handle.id, timeout=30)

    assert result["label"] == "billing" and result["cost"] > 0
    assert result["redactions"] == {"email": 1, "phone": 1, "iban": 1, "card": 1, "us_ssn": 1}
    assert result["draft"].startswith("Echo: Hi, I am Jane (<EMAIL_1>, <PHONE_1>)")
    sent = json.dumps([r.body for r in model_server.requests])
    assert "<EMAIL_1>" in sent and "<IBAN_1>" in sent and "<CARD_1>" in sent
    steps = query("SELECT output, error FROM steps WHERE run_id = ?", (handle.id,))
    audit = query("SELECT data FROM audit")
    assert len(steps) == 2 and audit
    for value in RAW.values():
        assert value not in sent, "raw PII reached the external provider"
        assert value not in caplog.text, "raw PII in the logs"
        for output, error in steps:
            assert value not in (output or "") + (error or ""), "raw PII in the step record"
        assert all(value not in (data or "") for (data,) in audit), "raw PII in the audit"

    # Outside the recorded path, a generated text gets its values back where the model
    # used the placeholders (restore_pii defaults to true).
    answer = await app.gateway.ask("reply_restored", PII_TEXT)
    assert answer.text == "Echo: " + PII_TEXT
    assert answer.redactions["email"] == 1
    assert RAW["email"] not in model_server.seen("/v1/messages")[-1].body["messages"][0]["content"]


# -- 2. the answer ------------------------------------------------------------------------


async def test_the_answer_carries_model_version_latency_tokens_and_cost(make_gateway, model_server):
    gw = make_gateway(setup(model_server, chain=["oa-small"]))
    answer = await gw.ask("ticket", "technical trouble")
    assert (answer.task, answer.label, answer.confidence) == ("ticket", "technical", 0.9)
    assert (answer.model, answer.version, answer.provider) == ("gpt-small", "2024-07", "oa")
    [seen] = model_server.seen(CHAT)
    usage_in = answer.tokens_in
    assert usage_in > 0 and answer.tokens_out > 0
    assert answer.cost_usd == pytest.approx((usage_in * 0.5 + answer.tokens_out * 1.5) / 1e6)
    assert answer.latency_ms > 0
    assert seen.body["model"] == "gpt-small"


async def test_embeddings_go_through_the_gateway(make_gateway, model_server):
    tasks = {"vec": {"capability": "embed", "chain": ["oa-small"]}}
    gw = make_gateway(setup(model_server, chain=["oa-small"], tasks=tasks))
    answer = await gw.ask("vec", "hello world")
    assert answer.embedding is not None and len(answer.embedding) == 8
    assert answer.label is None and answer.text is None


# -- 3. routing -------------------------------------------------------------------------------


async def test_pii_and_confidential_data_never_go_to_an_external_provider(
    make_gateway, model_server
):
    local, _, providers = fakes()
    gw = make_gateway(
        setup(
            model_server,
            chain=["oa-small", "local-clf"],
            tasks={
                "only_external": {"capability": "classify", "labels": LABELS, "chain": ["claude"]},
                "secret_task": {
                    "capability": "classify",
                    "labels": LABELS,
                    "chain": ["oa-small", "local-clf"],
                    "data": "confidential",
                },
            },
        ),
        {"local": local},
    )
    answer = await gw.ask("ticket", "billing", {"data": "pii"})
    assert (answer.provider, answer.fallback) == ("local", False)
    answer = await gw.ask("secret_task", "billing", {"data": "public"})  # cannot lower it
    assert answer.provider == "local"
    for data in ("pii", "confidential"):
        with pytest.raises(errors.NoEligibleModel, match=f"is external and the data is {data}"):
            await gw.ask("only_external", "billing", {"data": data})
    assert model_server.requests == []  # nothing ever left
    answer = await gw.ask("ticket", "billing", {"data": "internal"})
    assert answer.provider == "oa" and len(model_server.requests) == 1


async def test_an_injected_provider_that_says_it_is_external_counts_as_external(make_gateway):
    remote = FakeModel("local", external=True)
    gw = make_gateway(setup(chain=["local-clf"]), {"local": remote})
    with pytest.raises(errors.NoEligibleModel):
        await gw.ask("ticket", "billing", {"data": "pii"})
    answer = await gw.ask("ticket", "mail me at a@b.co about billing")
    assert answer.redactions == {"email": 1}
    assert remote.calls[0].text == "mail me at <EMAIL_1> about billing"


async def test_routes_pick_the_chain_by_risk_and_region_and_drop_what_does_not_fit(
    make_gateway, model_server
):
    local, _, providers = fakes()
    gw = make_gateway(
        setup(
            model_server,
            chain=["oa-small", "local-clf"],
            task={
                "routes": [
                    {"risk": ["high"], "chain": ["claude", "local-clf"]},
                    {"data": ["internal"], "region": ["apac"], "chain": ["local-clf"]},
                ]
            },
        ),
        {"local": local},
    )
    assert (await gw.ask("ticket", "billing", {"risk": "high"})).provider == "an"
    assert (await gw.ask("ticket", "billing", {"region": "apac"})).provider == "local"
    # region eu: the us provider is left out, the local one stays
    assert (await gw.ask("ticket", "billing", {"region": "eu"})).provider == "local"
    assert (await gw.ask("ticket", "billing", {"risk": "high", "region": "eu"})).provider == "an"
    chain, dropped = gw.route("ticket", "billing", {"region": "eu"})
    assert chain == ["local-clf"]
    assert dropped == {"oa-small": "provider 'oa' is in us, not eu"}
    assert (await gw.ask("ticket", "billing")).provider == "oa"


async def test_a_cost_ceiling_skips_models_estimated_above_it(make_gateway, model_server):
    local, _, providers = fakes()
    gw = make_gateway(
        setup(model_server, chain=["claude", "oa-small", "local-clf"], task={"max_tokens": 100}),
        {"local": local},
    )
    text = "billing " * 500  # ~1,100 input tokens
    # claude: ~1,100 * 3 + 100 * 15 per million = 0.0048; oa-small: ~0.0007
    assert (await gw.ask("ticket", text, {"max_cost_usd": 0.001})).provider == "oa"
    assert (await gw.ask("ticket", text, {"max_cost_usd": 0.0001})).provider == "local"
    chain, dropped = gw.route("ticket", text, {"max_cost_usd": 0.0001})
    assert chain == ["local-clf"] and "over 0.0001 USD" in dropped["claude"]


async def test_unknown_hints_and_data_classes_are_refused(make_gateway):
    _, _, providers = fakes()
    gw = make_gateway(setup(chain=["local-clf"]), providers)
    with pytest.raises(errors.ConfigurationError, match=r"unknown hints \['clasification'\]"):
        await gw.ask("ticket", "x", {"clasification": "pii"})
    with pytest.raises(errors.ConfigurationError, match="data='secret' is not a data class"):
        await gw.ask("ticket", "x", {"data": "secret"})
    with pytest.raises(errors.ConfigurationError, match="max_tokens must be"):
        await gw.ask("ticket", "x", {"max_tokens": 0})
    extended = make_gateway(setup(chain=["local-clf"]), providers, extra_hints=["tenant"])
    assert (await extended.ask("ticket", "billing", {"tenant": "acme"})).label == "billing"


# -- 3. fallbacks, retries, timeouts, breaker, rate limits -----------------------------------


async def test_429_retry_after_is_honoured_then_the_call_succeeds(
    make_gateway, model_server, sleeps
):
    model_server.script(CHAT, Reply(status=429, headers={"Retry-After": "2"}))
    gw = make_gateway(setup(model_server, chain=["oa-small"], oa={"retries": 2}))
    answer = await gw.ask("ticket", "billing")
    assert answer.label == "billing" and not answer.fallback
    assert sleeps.waits == [2.0]
    assert len(model_server.seen(CHAT)) == 2


async def test_a_retry_after_beyond_the_bound_is_not_waited_for(make_gateway, model_server, sleeps):
    model_server.script(CHAT, Reply(status=429, headers={"Retry-After": "3600"}))
    local, _, _ = fakes()
    gw = make_gateway(
        setup(model_server, chain=["oa-small", "local-clf"], oa={"retries": 3}),
        {"local": local},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.fallback) == ("local", True)
    assert sleeps.waits == [] and len(model_server.seen(CHAT)) == 1


async def test_5xx_is_retried_with_backoff_then_the_chain_falls_back(
    make_gateway, model_server, sleeps
):
    model_server.script(CHAT, Reply(status=500), Reply(status=502), Reply(status=503))
    local, _, _ = fakes()
    gw = make_gateway(
        setup(model_server, chain=["oa-small", "local-clf"], oa={"retries": 2}),
        {"local": local},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.fallback) == ("local", True)
    assert sleeps.waits == [0.25, 0.5]  # retry_backoff_s, doubled
    assert len(model_server.seen(CHAT)) == 3
    assert gw.stats()["fallbacks"] == 1


async def test_a_provider_that_times_out_falls_back(make_gateway, model_server):
    model_server.script(CHAT, Reply(delay=5.0))
    local, _, _ = fakes()
    gw = make_gateway(
        setup(model_server, chain=["oa-small", "local-clf"], oa={"timeout_s": 0.3}),
        {"local": local},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.fallback) == ("local", True)
    assert gw.stats()["providers"]["oa"]["failures"] == 1


async def test_malformed_answers_fall_back_and_when_all_fail_the_error_says_why(
    make_gateway, model_server
):
    model_server.script(CHAT, Reply(body="{oops"), Reply(content="billing, I think"))
    model_server.script("/v1/messages", Reply(content='{"label": "refund", "confidence": 1}'))
    local, _, _ = fakes()
    gw = make_gateway(
        setup(
            model_server,
            chain=["oa-small", "local-clf"],
            tasks={
                "strict": {
                    "capability": "classify",
                    "labels": LABELS,
                    "chain": ["oa-small", "claude"],
                }
            },
        ),
        {"local": local},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.fallback, answer.label) == ("local", True, "billing")
    with pytest.raises(errors.BadModelAnswer) as failed:
        await gw.ask("strict", "billing")
    message = str(failed.value)
    assert "oa-small: BadModelAnswer: Provider 'oa': the reply is not one JSON object" in message
    assert "claude: BadModelAnswer: Provider 'an': the label is not one of" in message


async def test_a_label_outside_the_task_is_a_bad_answer_even_from_a_local_model(make_gateway):
    class OffList(FakeModel):
        async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
            return base.ProviderResult(model="m", version="1", label="spam", confidence=1.0)

    gw = make_gateway(
        setup(chain=["local-clf", "backup-clf"]),
        {"local": OffList("local"), "backup": FakeModel("backup")},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.fallback) == ("backup", True)


async def test_the_circuit_opens_after_failures_and_lets_one_trial_through_after_reset(
    make_gateway, model_server, clock
):
    model_server.script(CHAT, Reply(status=500), Reply(status=500), Reply(status=500))
    local, _, _ = fakes()
    gw = make_gateway(
        setup(
            model_server,
            chain=["oa-small", "local-clf"],
            oa={"breaker": {"failures": 2, "reset_s": 30}},
        ),
        {"local": local},
    )
    for _ in range(2):
        assert (await gw.ask("ticket", "billing")).provider == "local"
    assert gw.stats()["providers"]["oa"]["circuit"] == "open"
    assert (await gw.ask("ticket", "billing")).provider == "local"
    assert len(model_server.seen(CHAT)) == 2  # the open circuit refused without calling
    clock.now += 30
    assert gw.stats()["providers"]["oa"]["circuit"] == "half_open"
    assert (await gw.ask("ticket", "billing")).provider == "local"  # the trial fails (500)
    assert gw.stats()["providers"]["oa"]["circuit"] == "open"
    clock.now += 30
    assert (await gw.ask("ticket", "billing")).provider == "oa"  # the trial succeeds
    assert gw.stats()["providers"]["oa"]["circuit"] == "closed"
    assert gw.stats()["providers"]["oa"]["circuit_opened"] == 2
    assert len(model_server.seen(CHAT)) == 4


async def test_a_rate_limited_provider_refuses_beyond_its_wait_and_the_chain_falls_back(
    make_gateway, clock, sleeps
):
    local, backup, providers = fakes()
    data = setup(chain=["local-clf", "backup-clf"])
    data["providers"]["local"].update(rate_per_s=1, burst=1, rate_max_wait_s=0)
    gw = make_gateway(data, providers)
    assert (await gw.ask("ticket", "billing")).provider == "local"
    assert (await gw.ask("ticket", "technical")).provider == "backup"  # no token left
    clock.now += 1
    assert (await gw.ask("ticket", "other")).provider == "local"
    assert len(local.calls) == 2 and sleeps.waits == []
    data["providers"]["local"].update(rate_max_wait_s=5)
    patient = make_gateway(data, {"local": FakeModel("local"), "backup": backup})
    await patient.ask("ticket", "billing")
    assert (await patient.ask("ticket", "technical")).provider == "local"
    assert sleeps.waits == [pytest.approx(1.0)]  # it waited for the next token


# -- 3. confidence threshold and escalation -------------------------------------------------


async def test_low_confidence_moves_down_the_chain_and_escalates_when_none_is_sure(
    make_gateway,
):
    local = FakeModel("local", confidence=0.55)
    backup = FakeModel("backup", confidence=0.8)
    gw = make_gateway(
        setup(chain=["local-clf", "backup-clf"], task={"confidence_threshold": 0.7}),
        {"local": local, "backup": backup},
    )
    answer = await gw.ask("ticket", "billing")
    assert (answer.provider, answer.confidence, answer.fallback) == ("backup", 0.8, True)
    assert not answer.escalate and answer.tokens_in == 20  # both calls are counted
    backup.confidence = 0.3
    answer = await gw.ask("ticket", "billing again")
    assert (answer.provider, answer.confidence, answer.escalate) == ("local", 0.55, True)
    assert not answer.fallback
    stats = gw.stats()
    assert (stats["escalations"], stats["fallbacks"]) == (1, 1)


# -- 3/10. config, keys, bad input -----------------------------------------------------------


async def test_gateway_from_toml_reads_keys_from_the_named_variables(
    tmp_path: Path, model_server, monkeypatch
):
    path = tmp_path / "models.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [providers.oa]
            type = "openai"
            base_url = "{model_server.url}/v1"
            api_key_env = "FLOWDESK_TEST_OA_KEY"

            [models.small]
            provider = "oa"
            model = "gpt-small"
            capabilities = ["classify"]

            [tasks.ticket]
            capability = "classify"
            labels = ["billing", "other"]
            chain = ["small"]
            """
        )
    )
    monkeypatch.delenv("FLOWDESK_TEST_OA_KEY", raising=False)
    with pytest.raises(errors.ConfigurationError, match=r"\$FLOWDESK_TEST_OA_KEY, which is not"):
        Gateway.from_toml(path)
    monkeypatch.setenv("FLOWDESK_TEST_OA_KEY", API_KEY)
    async with Gateway.from_toml(path) as gw:
        answer = await gw.ask("ticket", "billing")
    assert answer.label == "billing"
    assert model_server.seen(CHAT)[0].headers["authorization"] == f"Bearer {API_KEY}"


async def test_an_unknown_task_names_the_known_ones(make_gateway):
    _, _, providers = fakes()
    summary = {"capability": "generate", "chain": ["local-clf"]}
    gw = make_gateway(setup(chain=["local-clf"], tasks={"summary": summary}), providers)
    with pytest.raises(errors.UnknownModelTask, match=r"'tickets'\. Known tasks: summary, ticket"):
        await gw.ask("tickets", "x")


async def test_over_long_input_is_refused_not_truncated(make_gateway):
    local, _, providers = fakes()
    gw = make_gateway(setup(chain=["local-clf"], task={"max_input_chars": 20}), providers)
    with pytest.raises(errors.ModelInputTooLong, match="has 21 characters, more than its"):
        await gw.ask("ticket", "x" * 21)
    assert local.calls == []
    assert (await gw.ask("ticket", "x" * 20)).label == "other"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tasks"]["ticket"].update(chain=["nope"]), "model 'nope' is not defined"),
        (lambda d: d["tasks"]["ticket"].update(labels=["one"]), "at least two labels"),
        (lambda d: d["tasks"]["ticket"].update(chian=["x"]), "chian: Extra inputs"),
        (lambda d: d["models"]["backup-clf"].update(provider="x"), "provider 'x' is not"),
        (
            lambda d: d["tasks"]["ticket"].update(capability="generate", chain=["backup-clf"]),
            "cannot generate",
        ),
        (lambda d: d["providers"]["local"].update(type="grpc"), "providers.local.type"),
    ],
)
def test_config_mistakes_are_clear_errors(change: Callable[[dict[str, Any]], None], message):
    data = setup(chain=["local-clf"])
    change(data)
    with pytest.raises(errors.ConfigurationError, match=message):
        config.GatewayConfig.parse(data)


def test_the_documented_example_config_is_valid():
    doc = config.__doc__ or ""
    block = doc.split("A full example::\n", 1)[1].split("\nRouting, ", 1)[0]
    parsed = config.GatewayConfig.parse(
        __import__("tomllib").loads(textwrap.dedent(block)), "the example"
    )
    assert parsed.tasks["ticket_category"].chain == ["local_tickets", "small", "haiku"]
    assert parsed.providers["vllm"].is_external is False
    assert parsed.providers["openai"].breaker.failures == 5


# -- 5. cache ---------------------------------------------------------------------------------


async def test_the_cache_answers_normalised_repeats_until_its_ttl_and_reports_hit_rate(
    make_gateway, clock
):
    local, _, providers = fakes()
    gw = make_gateway(setup(chain=["local-clf"], task={"cache_ttl_s": 60}), providers)
    first = await gw.ask("ticket", "Billing  question\n")
    again = await gw.ask("ticket", "  billing QUESTION ")
    assert not first.cached and again.cached
    assert again.label == first.label and again.version == first.version
    assert (again.tokens_in, again.cost_usd) == (0, 0.0)  # nothing was spent
    assert len(local.calls) == 1
    await gw.ask("ticket", "another question")
    stats = gw.stats()["cache"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 2)
    assert stats["hit_rate"] == pytest.approx(1 / 3)
    clock.now += 61
    assert not (await gw.ask("ticket", "billing question")).cached
    assert len(local.calls) == 3


async def test_the_cache_is_keyed_on_version_and_can_be_turned_off(make_gateway):
    local, _, providers = fakes()
    models = {"local-clf": {**MODELS["local-clf"], "version": "8"}}
    gw = make_gateway(setup(chain=["local-clf"]), providers)
    gw8 = make_gateway(setup(chain=["local-clf"], models=models), providers, cache_backend=gw.cache)
    await gw.ask("ticket", "billing")
    assert (await gw.ask("ticket", "billing")).cached
    assert not (await gw8.ask("ticket", "billing")).cached  # same cache, another version
    off = make_gateway(setup(chain=["local-clf"], task={"cache_ttl_s": 0}), providers)
    await off.ask("ticket", "billing")
    assert not (await off.ask("ticket", "billing")).cached


# -- canary and shadow ------------------------------------------------------------------------


async def test_a_canary_version_is_sticky_per_key_and_flagged(make_gateway):
    local, _, providers = fakes()
    models = {
        "local-clf": {**MODELS["local-clf"], "canary_version": "8", "canary_percent": 30},
    }
    gw = make_gateway(setup(chain=["local-clf"], task={"cache_ttl_s": 0}, models=models), providers)
    picks = {}
    for i in range(200):
        answer = await gw.ask("ticket", "billing", {"key": f"customer-{i}"})
        assert answer.canary == (answer.version == "8")
        picks[i] = answer.canary
    assert 30 < sum(picks.values()) < 90  # ~30 % of keys (sticky hashing, not random)
    for i in range(20):  # the same key gets the same version again
        assert (await gw.ask("ticket", "x", {"key": f"customer-{i}"})).canary == picks[i]
    assert local.calls[0].version in ("7", "8")


async def test_a_shadow_version_answers_beside_and_is_recorded_with_agreement(make_gateway):
    class Versioned(FakeModel):
        async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
            result = await super().infer(request)
            if request.version == "9":  # the shadow model disagrees, and costs tokens
                return base.ProviderResult(
                    model=result.model, version="9", label="other", confidence=0.6, tokens_in=5
                )
            return result

    local = Versioned("local")
    models = {"local-clf": {**MODELS["local-clf"], "shadow_version": "9"}}
    gw = make_gateway(setup(chain=["local-clf"], models=models), {"local": local})
    answer = await gw.ask("ticket", "billing")
    assert (answer.label, answer.version, answer.canary) == ("billing", "7", False)
    assert answer.shadow is not None
    assert {k: answer.shadow[k] for k in ("version", "label", "confidence", "agree")} == {
        "version": "9",
        "label": "other",
        "confidence": 0.6,
        "agree": False,
    }
    assert answer.tokens_in == 15  # main 10 + shadow 5
    assert sorted(r.version or "" for r in local.calls) == ["7", "9"]
    assert gw.stats()["shadow"] == 1


async def test_a_failing_shadow_never_fails_the_answer(make_gateway):
    class ShadowDown(FakeModel):
        async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
            if request.version == "9":
                raise errors.ProviderUnavailable("shadow is down")
            return await super().infer(request)

    models = {"local-clf": {**MODELS["local-clf"], "shadow_version": "9"}}
    data = setup(chain=["local-clf"], models=models)
    data["providers"]["local"]["retries"] = 0
    gw = make_gateway(data, {"local": ShadowDown("local")})
    answer = await gw.ask("ticket", "billing")
    assert answer.label == "billing"
    assert answer.shadow == {"error": "ProviderUnavailable", "message": "shadow is down"}


# -- seams -----------------------------------------------------------------------------------


async def test_interceptors_can_refuse_a_call_and_record_usage(make_gateway):
    local, backup, providers = fakes()
    usage: list[tuple[str, float, int]] = []

    async def budget(call: ModelCall, next: CallNext) -> CallOutcome:
        if call.model == "local-clf" and call.request.hints.get("risk") == "over-budget":
            raise errors.BudgetExceeded("tenant budget spent")
        return await next(call)

    async def ledger(call: ModelCall, next: CallNext) -> CallOutcome:
        outcome = await next(call)
        usage.append((call.model, outcome.cost_usd, outcome.attempts))
        return outcome

    models = {"local-clf": {**MODELS["local-clf"], "price_in_per_mtok": 1000.0}}
    gw = make_gateway(
        setup(chain=["local-clf", "backup-clf"], models=models, task={"cache_ttl_s": 0}),
        providers,
        interceptors=[budget, ledger],
    )
    assert (await gw.ask("ticket", "billing")).provider == "local"
    answer = await gw.ask("ticket", "billing", {"risk": "over-budget"})
    assert (answer.provider, answer.fallback) == ("backup", True)
    assert usage == [("local-clf", pytest.approx(0.01), 1), ("backup-clf", 0.0, 1)]


async def test_a_version_policy_and_observers_plug_in(make_gateway):
    local, _, providers = fakes()
    seen: list[tuple[str, str, str | None]] = []

    class Pinned(ConfiguredVersions):
        async def choose(self, query: VersionQuery) -> VersionChoice:
            if query.key == "vip":
                return VersionChoice(version="canary-1", canary=True)
            return await super().choose(query)

    async def observer(event: Any) -> None:
        seen.append((event.task, event.answer.version, event.run_id))

    gw = make_gateway(
        setup(chain=["local-clf"]), providers, versions=Pinned(), observers=[observer]
    )
    assert (await gw.ask("ticket", "billing", {"key": "vip"})).canary
    assert not (await gw.ask("ticket", "billing", {"key": "other"})).canary
    assert seen == [("ticket", "canary-1", None), ("ticket", "7", None)]
    assert gw.stats()["canary"] == 1
