"""The model gateway: one place between workflows and every model provider.

``ctx.model(task, input, **hints)`` (recorded as a step) and `Gateway.ask` both come
here. For each call the gateway:

1. looks the task up in the config (`UnknownModelTask` names the known ones), checks the
   hints (an unknown hint is an error: a misspelt ``data="pii"`` must not route personal
   data outside) and the input's length (`ModelInputTooLong`, never truncated);
2. routes: picks the task's chain (or the first matching route's), drops the models that
   may not take this call (see `flowdesk.models.config`), and raises `NoEligibleModel`
   when none is left;
3. tries the chain in order. For each model: the version policy chooses the version
   (canary, shadow); text for an external provider is PII-redacted (`pii.Redactor`); the
   cache answers when it can; else the call passes the interceptors (budgets, shared rate
   limits and usage records plug in here) and the provider's guards: token bucket,
   circuit breaker, timeout, and retries of `ProviderUnavailable` that honour
   ``Retry-After`` up to ``max_retry_after_s``. Any `ModelError` moves on to the next
   model (``fallback``). A classification whose confidence is below the task's
   ``confidence_threshold`` also moves on; when no model is sure enough, the most
   confident answer comes back with ``escalate=True`` so the workflow can ask a person;
   With ``schema=Model`` (a Pydantic model; generate tasks) every provider is asked for
   JSON that follows the model's schema and the reply is validated with the model; a
   reply that fails is asked again once with the validation error, and a second failure
   is `AnswerRejected` (the chain falls back). A generated answer longer than the task's
   ``max_answer_chars`` is refused the same way, and ``answer_timeout_s`` bounds the whole
   call (`AnswerTimeout`). An answer that fails a guardrail is never passed on;
4. restores the placeholders in the answer's text and returns an `Answer`: label or
   text (or embedding), confidence, model and version, provider, latency, tokens and cost
   (everything spent for this answer: escalations and the shadow included; 0 on a cache
   hit), and the flags ``cached``, ``fallback``, ``canary``, ``shadow`` and ``escalate``,
   with the redactions counted by kind (never the values), and ``data``: the validated
   JSON when a schema was given.

Streaming: ``ask(..., on_chunk=sink)`` (or ``async for part in gateway.stream(...)``)
passes the answer's text to ``sink`` as providers write it (`base.Chunk`; placeholders
restored on the way, a placeholder cut in two held back until whole), with a
``restart`` chunk when a retry or fallback makes the text so far void. The returned
`Answer` holds the whole text, and that is what ``ctx.model`` records: a replay returns
it whole without streaming or calling a model.

Seams for what comes on top (each takes one frozen input dataclass):

* `Interceptor`: ``async (call: ModelCall, next) -> CallOutcome`` around every provider
  call (shadow calls too): check a budget or a shared rate limit before ``next`` (raise
  `BudgetExceeded` to refuse; the gateway falls back), record usage after it.
* `VersionPolicy`: ``async choose(VersionQuery) -> VersionChoice``; the default,
  `ConfiguredVersions`, reads ``canary_version``/``canary_percent`` (sticky per routing
  key) and ``shadow_version`` from the model's config.
* `AnswerObserver`: ``async (AnswerEvent) -> None`` after each answer (drift monitors).
* `cache.AnswerCache`: the default is an in-process LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from flowdesk import errors
from flowdesk.models import base, cache, http, pii, streaming, structured
from flowdesk.models import breaker as guards
from flowdesk.models import config as cfg
from flowdesk.models import providers as providers_mod
from flowdesk.models.seams import (
    AnswerEvent,
    AnswerObserver,
    CallNext,
    CallOutcome,
    ConfiguredVersions,
    Interceptor,
    ModelCall,
    VersionChoice,
    VersionPolicy,
    VersionQuery,
    sticky_percent,
)

__all__ = [  # the seams live in flowdesk.models.seams and are re-exported here
    "HINTS",
    "AnswerEvent",
    "AnswerObserver",
    "CallNext",
    "CallOutcome",
    "ConfiguredVersions",
    "Gateway",
    "Interceptor",
    "ModelCall",
    "VersionChoice",
    "VersionPolicy",
    "VersionQuery",
    "sticky_percent",
]

log = logging.getLogger("flowdesk.models")

_DONE = object()


# -- the gateway ------------------------------------------------------------------------

HINTS = frozenset({"risk", "data", "region", "key", "max_cost_usd", "max_tokens", "temperature"})


@dataclass(slots=True)
class _Slot:
    """A provider with its guards and counters."""

    name: str
    provider: base.Provider
    settings: cfg.ProviderConfig
    external: bool
    breaker: guards.CircuitBreaker
    bucket: guards.TokenBucket | None
    calls: int = 0
    failures: int = 0


@dataclass(slots=True)
class _Counters:
    asked: int = 0
    answered: int = 0
    failed: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fallbacks: int = 0
    escalations: int = 0
    canary: int = 0
    shadow: int = 0
    redactions: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Tried:
    """A model's acceptable answer while the chain is still being walked."""

    index: int
    result: base.ProviderResult
    provider: str
    canary: bool
    cached: bool
    shadow: dict[str, Any] | None
    data: Any = None  # the validated structured answer, as JSON


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(
            to_jsonable_python(value), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
    except Exception as exc:
        raise errors.SerializationError(
            f"Model input of type {type(value).__name__} is neither text nor JSON-able: {exc}"
        ) from exc


class Gateway:
    """The model gateway (see the module docstring).

    ``providers`` supplies ready instances by name (they replace what the config would
    build; the config still gives their guards). ``env`` is where API keys are read
    (default: the process environment); a named variable that is missing fails here.
    ``clock`` (monotonic seconds) and ``sleep`` are injectable so tests need not wait."""

    def __init__(
        self,
        config: cfg.GatewayConfig,
        *,
        providers: Mapping[str, base.Provider] | None = None,
        env: Mapping[str, str] | None = None,
        cache_backend: cache.AnswerCache | None = None,
        versions: VersionPolicy | None = None,
        interceptors: Sequence[Interceptor] = (),
        observers: Sequence[AnswerObserver] = (),
        extra_hints: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        given = dict(providers or {})
        unknown = sorted(set(given) - set(config.providers))
        if unknown:
            raise errors.ConfigurationError(
                f"Providers {unknown} are not in the config: add a [providers.NAME] table "
                "for each (it sets the provider's timeout, retries, breaker and rate limit)."
            )
        keys = config.model_copy(
            update={"providers": {n: p for n, p in config.providers.items() if n not in given}}
        ).check_keys(os.environ if env is None else env)
        self._sleep = sleep
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        for name, settings in config.providers.items():
            provider = given.get(name) or providers_mod.build_provider(
                name, settings, keys.get(name)
            )
            bucket = None
            if settings.rate_per_s is not None:
                bucket = guards.TokenBucket(
                    name,
                    rate=settings.rate_per_s,
                    burst=settings.burst,
                    max_wait=settings.rate_max_wait_s,
                    clock=clock,
                    sleep=sleep,
                )
            self._slots[name] = _Slot(
                name=name,
                provider=provider,
                settings=settings,
                external=settings.is_external or provider.external,
                breaker=guards.CircuitBreaker(
                    name,
                    failures=settings.breaker.failures,
                    reset_s=settings.breaker.reset_s,
                    clock=clock,
                ),
                bucket=bucket,
            )
        self.redactor = pii.Redactor(phone_regions=config.gateway.phone_regions)
        self.cache: cache.AnswerCache | None = cache_backend
        if self.cache is None and config.gateway.cache_size > 0:
            self.cache = cache.LRUCache(config.gateway.cache_size, clock=clock)
        self.versions: VersionPolicy = versions or ConfiguredVersions()
        self.interceptors: list[Interceptor] = list(interceptors)
        self.observers: list[AnswerObserver] = list(observers)
        self.hints = HINTS | frozenset(extra_hints)
        self._counters = _Counters()
        for name, spec in config.models.items():  # a missing GGUF file fails here, not later
            check = getattr(self._slots[spec.provider].provider, "check_model", None)
            if check is not None:
                check(spec.model, f"models.{name}")

    @classmethod
    def default(cls, **kwargs: Any) -> Gateway:
        """The gateway with no configuration: the packaged SmolLM2 answers the task
        ``generate`` in this process (`flowdesk.models.llama.default_config`). A clear
        `ConfigurationError` when the ``llm`` extra or the model package is missing."""
        from flowdesk.models import llama

        return cls(llama.default_config(), **kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **kwargs: Any) -> Gateway:
        """A gateway for the TOML config file at ``path`` (see `flowdesk.models.config`)."""
        return cls(cfg.GatewayConfig.from_toml(path), **kwargs)

    async def close(self) -> None:
        for slot in self._slots.values():
            await slot.provider.close()
        if self.cache is not None:
            await self.cache.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the engine's port (flowdesk.engine.gateway_port.ModelGateway) -----------------
    async def answer(
        self,
        task: str,
        input: Any,
        hints: dict[str, Any],
        *,
        run_id: str,
        seq: int,
        workflow: str,
        schema: type[BaseModel] | None = None,
        on_chunk: base.ChunkSink | None = None,
    ) -> dict[str, Any]:
        answer = await self.ask(
            task,
            input,
            hints,
            run_id=run_id,
            seq=seq,
            workflow=workflow,
            schema=schema,
            on_chunk=on_chunk,
        )
        return answer.model_dump(mode="json")

    def load_answer(self, recorded: dict[str, Any]) -> base.Answer:
        return base.Answer.model_validate(recorded)

    # -- asking ------------------------------------------------------------------------
    async def ask(
        self,
        task: str,
        input: Any,
        hints: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        seq: int | None = None,
        workflow: str | None = None,
        schema: type[BaseModel] | None = None,
        on_chunk: base.ChunkSink | None = None,
        provider: str | None = None,
    ) -> base.Answer:
        """Answer ``input`` for ``task`` (outside a workflow; inside one use ``ctx.model``).

        ``schema``: a Pydantic model the answer must be (``Answer.data`` holds it as
        JSON); ``on_chunk``: receives the text as it is written (see the module
        docstring); ``provider``: only the chain's models on this provider may answer."""
        started = time.perf_counter()
        self._counters.asked += 1
        try:
            limit = self._task(task).answer_timeout_s
            try:
                async with asyncio.timeout(limit):
                    answer = await self._ask(
                        task,
                        input,
                        dict(hints or {}),
                        run_id,
                        seq,
                        workflow,
                        schema,
                        on_chunk,
                        provider,
                    )
            except TimeoutError:
                if limit is None:
                    raise
                raise errors.AnswerTimeout(
                    f"Task {task!r}: no acceptable answer within answer_timeout_s = "
                    f"{limit:g} s; the generation in progress was stopped."
                ) from None
        except BaseException:
            self._counters.failed += 1
            raise
        answer.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self._counters.answered += 1
        if self.observers:
            event = AnswerEvent(
                task=task, text=_as_text(input), answer=answer, run_id=run_id, workflow=workflow
            )
            for observer in self.observers:
                try:
                    await observer(event)
                except Exception:
                    log.exception("answer observer %r failed", observer)
        return answer

    async def stream(
        self,
        task: str,
        input: Any,
        hints: Mapping[str, Any] | None = None,
        *,
        schema: type[BaseModel] | None = None,
        provider: str | None = None,
    ) -> AsyncIterator[base.Chunk | base.Answer]:
        """``ask`` as an async iterator: the `base.Chunk` pieces as they are written, then
        the `base.Answer` last (or the error). Leaving the loop early stops the model."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def sink(chunk: base.Chunk) -> None:
            queue.put_nowait(chunk)

        job = asyncio.create_task(
            self.ask(task, input, hints, schema=schema, on_chunk=sink, provider=provider)
        )
        job.add_done_callback(lambda _: queue.put_nowait(_DONE))
        try:
            while (item := await queue.get()) is not _DONE:
                yield item
            yield job.result()
        finally:
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job  # the caller left: the answer, or its error, is moot

    def _task(self, task: str) -> cfg.TaskConfig:
        tcfg = self.config.tasks.get(task)
        if tcfg is None:
            raise errors.UnknownModelTask(task, list(self.config.tasks))
        return tcfg

    def _check_hints(self, task: str, hints: dict[str, Any]) -> None:
        unknown = sorted(set(hints) - self.hints)
        if unknown:
            raise errors.ConfigurationError(
                f"ctx.model({task!r}): unknown hints {unknown}; the gateway reads "
                f"{', '.join(sorted(self.hints))}."
            )
        data = hints.get("data")
        if data is not None and data not in cfg.DATA_CLASSES:
            raise errors.ConfigurationError(
                f"ctx.model({task!r}): data={data!r} is not a data class; use one of "
                f"{', '.join(cfg.DATA_CLASSES)}."
            )
        for name in ("risk", "region", "key"):
            if hints.get(name) is not None and not isinstance(hints[name], str):
                raise errors.ConfigurationError(f"ctx.model({task!r}): {name} must be text.")
        for name in ("max_cost_usd", "temperature"):
            value = hints.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise errors.ConfigurationError(
                    f"ctx.model({task!r}): {name} must be a number >= 0."
                )
        tokens = hints.get("max_tokens")
        if tokens is not None and (
            isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
        ):
            raise errors.ConfigurationError(f"ctx.model({task!r}): max_tokens must be >= 1.")

    def route(
        self, task: str, text: str, hints: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, str]]:
        """(the models to try in order, {model: why it was left out}) for this call."""
        tcfg = self._task(task)
        # A hint can raise the task's data class, never lower it.
        floor = tcfg.data or self.config.gateway.default_data
        data: str = hints.get("data") or floor
        if tcfg.data is not None:
            data = max(data, tcfg.data, key=cfg.DATA_CLASSES.index)
        region: str | None = hints.get("region") or tcfg.region
        risk: str | None = hints.get("risk")
        chain = tcfg.chain
        for rule in tcfg.routes:
            if rule.matches(risk, data, region):
                chain = rule.chain
                break
        ceilings = [c for c in (tcfg.max_cost_usd, hints.get("max_cost_usd")) if c is not None]
        ceiling = min(ceilings) if ceilings else None
        tokens_in = math.ceil((len(text) + len(tcfg.instructions or "") + 200) / 4)
        tokens_out = hints.get("max_tokens") or tcfg.max_tokens or 0
        if not tokens_out:
            tokens_out = {"classify": 32, "generate": 512, "embed": 0}[tcfg.capability]
        keep: list[str] = []
        dropped: dict[str, str] = {}
        for name in chain:
            spec = self.config.models[name]
            slot = self._slots[spec.provider]
            if tcfg.capability not in spec.capabilities:
                dropped[name] = f"cannot {tcfg.capability}"
            elif slot.external and data in cfg.SENSITIVE:
                dropped[name] = f"provider {slot.name!r} is external and the data is {data}"
            elif region is not None and slot.external and slot.settings.region != region:
                where = slot.settings.region or "an unstated region"
                dropped[name] = f"provider {slot.name!r} is in {where}, not {region}"
            elif ceiling is not None and spec.cost(tokens_in, tokens_out) > ceiling:
                estimate = spec.cost(tokens_in, tokens_out)
                dropped[name] = f"estimated cost {estimate:.6f} USD is over {ceiling:g} USD"
            else:
                keep.append(name)
        return keep, dropped

    async def _ask(
        self,
        task: str,
        input: Any,
        hints: dict[str, Any],
        run_id: str | None,
        seq: int | None,
        workflow: str | None,
        schema: type[BaseModel] | None = None,
        on_chunk: base.ChunkSink | None = None,
        provider: str | None = None,
    ) -> base.Answer:
        tcfg = self._task(task)
        self._check_hints(task, hints)
        if schema is not None:
            structured.json_schema(schema)  # a class that is no Pydantic model fails here
            if tcfg.capability != "generate":
                raise errors.ConfigurationError(
                    f"ctx.model({task!r}, schema={schema.__name__}): structured output needs "
                    f"a generate task; {task!r} is a {tcfg.capability} task."
                )
        text = _as_text(input)
        if len(text) > tcfg.max_input_chars:
            raise errors.ModelInputTooLong(task, len(text), tcfg.max_input_chars)
        chain, dropped = self.route(task, text, hints)
        if provider is not None:
            if provider not in self._slots:
                raise errors.ConfigurationError(
                    f"No provider {provider!r} in the gateway's config (providers: "
                    f"{', '.join(sorted(self._slots))})."
                )
            for name in list(chain):
                on = self.config.models[name].provider
                if on != provider:
                    chain.remove(name)
                    dropped[name] = f"on provider {on!r}, not {provider!r}"
        sink = (
            streaming.StreamSink(on_chunk, tcfg.max_answer_chars) if on_chunk is not None else None
        )
        if not chain:
            raise errors.NoEligibleModel(task, dropped)
        key = hints.get("key") or run_id or hashlib.sha256(text.encode()).hexdigest()[:16]
        redaction: pii.Redaction | None = None
        failures: dict[str, errors.ModelError] = {}
        best: _Tried | None = None
        spent = [0, 0, 0.0]  # tokens in, tokens out, cost
        for index, name in enumerate(chain):
            spec = self.config.models[name]
            slot = self._slots[spec.provider]
            if slot.external and redaction is None:
                redaction = self.redactor.redact(text)
                for kind, n in redaction.counts.items():
                    self._counters.redactions[kind] = self._counters.redactions.get(kind, 0) + n
            try:
                tried = await self._try_model(
                    index,
                    name,
                    spec,
                    slot,
                    tcfg,
                    task,
                    text,
                    redaction if slot.external else None,
                    hints,
                    key,
                    run_id,
                    seq,
                    workflow,
                    spent,
                    schema,
                    sink,
                )
            except errors.ModelError as exc:
                failures[name] = exc
                log.warning(
                    "model %s (provider %s) failed for task %s: %s: %s",
                    name,
                    slot.name,
                    task,
                    type(exc).__name__,
                    exc.message,
                )
                continue
            confidence = tried.result.confidence
            threshold = tcfg.confidence_threshold
            sure = (
                tcfg.capability != "classify"
                or threshold is None
                or (confidence is not None and confidence >= threshold)
            )
            if sure:
                return self._answer(tcfg, task, tried, redaction, spent, schema, escalate=False)
            log.info(
                "model %s answered task %s below its confidence threshold (%s < %s)",
                name,
                task,
                confidence,
                threshold,
            )
            if best is None or (confidence or 0.0) > (best.result.confidence or 0.0):
                best = tried
        if best is not None:
            return self._answer(tcfg, task, best, redaction, spent, schema, escalate=True)
        raise self._all_failed(task, failures, dropped)

    def _answer(
        self,
        tcfg: cfg.TaskConfig,
        task: str,
        tried: _Tried,
        redaction: pii.Redaction | None,
        spent: list[Any],
        schema: type[BaseModel] | None,
        *,
        escalate: bool,
    ) -> base.Answer:
        result = tried.result
        text = result.text
        data = tried.data
        if text is not None and redaction is not None and tcfg.restore_pii:
            text = redaction.restore(text)
            if schema is not None and data is not None:
                restored = structured.map_strings(data, redaction.restore)
                try:
                    data = schema.model_validate(restored).model_dump(mode="json")
                except ValueError as exc:
                    raise errors.AnswerRejected(
                        f"Task {task!r}: the answer no longer matches {schema.__name__} once "
                        f"its redacted values are put back ({exc.__class__.__name__})."
                    ) from None
        counters = self._counters
        counters.fallbacks += tried.index > 0
        counters.escalations += escalate
        counters.canary += tried.canary
        counters.shadow += tried.shadow is not None
        answer = base.Answer(
            task=task,
            label=result.label,
            text=text,
            confidence=result.confidence,
            scores=result.scores,
            embedding=result.embedding,
            model=result.model,
            version=result.version,
            provider=tried.provider,
            latency_ms=0.0,
            tokens_in=spent[0],
            tokens_out=spent[1],
            cost_usd=round(spent[2], 10),
            cached=tried.cached,
            fallback=tried.index > 0,
            canary=tried.canary,
            shadow=tried.shadow,
            escalate=escalate,
            redactions=dict(redaction.counts) if redaction is not None else {},
            data=data,
        )
        log.debug(
            "task %s answered by %s %s (provider %s, cached=%s, fallback=%s, escalate=%s)",
            task,
            answer.model,
            answer.version,
            answer.provider,
            answer.cached,
            answer.fallback,
            answer.escalate,
        )
        return answer

    @staticmethod
    def _all_failed(
        task: str, failures: dict[str, errors.ModelError], dropped: dict[str, str]
    ) -> errors.ModelError:
        why = "; ".join(f"{m}: {type(e).__name__}: {e.message}" for m, e in failures.items())
        if dropped:
            why += "; left out: " + "; ".join(f"{m}: {r}" for m, r in dropped.items())
        kinds = {type(e) for e in failures.values()}
        cls: type[errors.ModelError]
        if errors.ProviderUnavailable in kinds:
            cls = errors.ProviderUnavailable
        elif len(kinds) == 1:
            cls = kinds.pop()
            if cls not in (
                errors.BadModelAnswer,
                errors.AnswerRejected,
                errors.BudgetExceeded,
                errors.ModelOverloaded,
            ):
                cls = errors.ModelError
        else:
            cls = errors.ModelError
        return cls(f"Every model for task {task!r} failed: {why}.")

    async def _try_model(
        self,
        index: int,
        name: str,
        spec: cfg.ModelConfig,
        slot: _Slot,
        tcfg: cfg.TaskConfig,
        task: str,
        text: str,
        redaction: pii.Redaction | None,
        hints: dict[str, Any],
        key: str,
        run_id: str | None,
        seq: int | None,
        workflow: str | None,
        spent: list[Any],
        schema: type[BaseModel] | None = None,
        sink: streaming.StreamSink | None = None,
    ) -> _Tried:
        choice = await self.versions.choose(VersionQuery(task=task, model=name, spec=spec, key=key))
        max_tokens = hints.get("max_tokens") or tcfg.max_tokens
        json_schema = structured.json_schema(schema) if schema is not None else None
        options = {
            "max_tokens": max_tokens,
            "temperature": hints.get("temperature"),
            "schema": json_schema,
        }
        if sink is not None:
            sink.use(redaction if tcfg.restore_pii else None)
        ttl = tcfg.cache_ttl_s if tcfg.cache_ttl_s is not None else self.config.gateway.cache_ttl_s
        cache_key = None
        if self.cache is not None and ttl > 0:
            cache_key = cache.cache_key(
                task=task,
                model=name,
                version=choice.version,
                text=text,
                labels=tcfg.labels,
                options={**options, "system": tcfg.instructions},
            )
            hit = await self.cache.get(cache_key)
            if hit is not None:
                self._counters.cache_hits += 1
                self._check(slot, tcfg, hit)
                data = None
                if schema is not None:
                    data = structured.validate(hit.text, schema).model_dump(mode="json")
                if sink is not None:
                    await sink.whole(hit.text)
                return _Tried(index, hit, slot.name, choice.canary, True, None, data)
            self._counters.cache_misses += 1
        request_hints: dict[str, Any] = {
            k: v for k, v in hints.items() if k in ("risk", "data", "region", "temperature")
        }
        if tcfg.instructions:
            request_hints["system"] = tcfg.instructions
        request = base.ModelRequest(
            task=task,
            capability=tcfg.capability,
            text=redaction.text if redaction is not None else text,
            model=self._wire_model(spec, slot, choice.version),
            # A local model with no pinned version answers with its registry's current one.
            version=(
                None
                if slot.settings.type == "local"
                and spec.version is None
                and choice.version == spec.current_version
                else choice.version
            ),
            hints=request_hints,
            labels=tuple(tcfg.labels),
            max_tokens=max_tokens,
            timeout=slot.settings.timeout_s,
            schema=json_schema,
            schema_name=structured.schema_name(schema) if schema is not None else "answer",
        )
        tokens_in = math.ceil((len(request.text) + len(tcfg.instructions or "") + 200) / 4)
        call = ModelCall(
            task=task,
            model=name,
            provider=slot.name,
            external=slot.external,
            request=request,
            estimated_cost_usd=spec.cost(tokens_in, max_tokens or 0),
            spec=spec,
            run_id=run_id,
            seq=seq,
            workflow=workflow,
            canary=choice.canary,
            sink=sink,
        )
        shadow_task: asyncio.Task[CallOutcome] | None = None
        if choice.shadow_version and choice.shadow_version != choice.version:
            shadow_call = replace(
                call,
                request=replace(
                    request,
                    version=choice.shadow_version,
                    model=self._wire_model(spec, slot, choice.shadow_version),
                ),
                canary=False,
                shadow=True,
                sink=None,
            )
            shadow_task = asyncio.create_task(self._pipeline(shadow_call))
        data = None
        try:
            outcome = await self._pipeline(call)
            self._spend(spent, outcome)
            self._check(slot, tcfg, outcome.result)
            if schema is not None:
                outcome, data = await self._structured(call, slot, tcfg, schema, outcome, spent)
        except BaseException:
            if shadow_task is not None:
                shadow_task.cancel()
            raise
        shadow = None
        if shadow_task is not None:
            shadow = await self._shadow_record(shadow_task, outcome.result, spent)
        if cache_key is not None and self.cache is not None:
            await self.cache.put(cache_key, outcome.result, ttl)
        return _Tried(index, outcome.result, slot.name, choice.canary, False, shadow, data)

    @staticmethod
    def _spend(spent: list[Any], outcome: CallOutcome) -> None:
        spent[0] += outcome.result.tokens_in
        spent[1] += outcome.result.tokens_out
        spent[2] += outcome.cost_usd

    async def _structured(
        self,
        call: ModelCall,
        slot: _Slot,
        tcfg: cfg.TaskConfig,
        schema: type[BaseModel],
        outcome: CallOutcome,
        spent: list[Any],
    ) -> tuple[CallOutcome, Any]:
        """(the outcome, its validated data): the answer validated with ``schema``, else
        asked once more with the validation error, else `AnswerRejected`."""
        try:
            instance = structured.validate(outcome.result.text, schema)
        except errors.BadModelAnswer as exc:
            log.info(
                "model %s answered task %s outside %s, asking again: %s",
                call.model,
                call.task,
                schema.__name__,
                exc.message,
            )
            retry = replace(
                call,
                request=replace(
                    call.request,
                    previous=outcome.result.text,
                    feedback=structured.feedback(schema, exc.message),
                ),
            )
            outcome = await self._pipeline(retry)
            self._spend(spent, outcome)
            self._check(slot, tcfg, outcome.result)
            try:
                instance = structured.validate(outcome.result.text, schema)
            except errors.BadModelAnswer as again:
                raise errors.AnswerRejected(
                    f"Model {call.model!r} (provider {slot.name!r}) answered task "
                    f"{call.task!r} twice outside {schema.__name__}; the second time "
                    f"{again.message}"
                ) from None
        return outcome, instance.model_dump(mode="json")

    @staticmethod
    def _wire_model(spec: cfg.ModelConfig, slot: _Slot, version: str) -> str:
        """The model id to send. For HTTP providers a canary or shadow version *is* a model
        id; local providers get the model name and read the version from the request."""
        if isinstance(slot.provider, http.HttpProvider) and version != spec.current_version:
            return version
        return spec.model

    @staticmethod
    def _check(slot: _Slot, tcfg: cfg.TaskConfig, result: base.ProviderResult) -> None:
        """The provider's result fits the task, or `BadModelAnswer`."""
        where = f"Provider {slot.name!r}"
        if tcfg.capability == "classify":
            if result.label not in tcfg.labels:
                raise errors.BadModelAnswer(
                    f"{where} answered a label that is not one of the task's {tcfg.labels}."
                )
            if result.confidence is not None and not 0.0 <= result.confidence <= 1.0:
                raise errors.BadModelAnswer(f"{where} answered a confidence outside [0, 1].")
        elif tcfg.capability == "generate":
            if not isinstance(result.text, str):
                raise errors.BadModelAnswer(f"{where} answered no text.")
            limit = tcfg.max_answer_chars
            if limit is not None and len(result.text) > limit:
                raise errors.AnswerRejected(
                    f"{where} answered {len(result.text)} characters, more than the task's "
                    f"max_answer_chars = {limit}; the answer is not passed on."
                )
        elif not result.embedding:
            raise errors.BadModelAnswer(f"{where} answered no embedding.")

    async def _shadow_record(
        self,
        shadow_task: asyncio.Task[CallOutcome],
        main: base.ProviderResult,
        spent: list[Any],
    ) -> dict[str, Any]:
        try:
            outcome = await shadow_task
        except errors.ModelError as exc:
            return {"error": type(exc).__name__, "message": exc.message}
        result = outcome.result
        spent[0] += result.tokens_in
        spent[1] += result.tokens_out
        spent[2] += outcome.cost_usd
        agree = None
        if main.label is not None:
            agree = result.label == main.label
        elif main.text is not None:
            agree = result.text == main.text
        return {
            "model": result.model,
            "version": result.version,
            "label": result.label,
            "confidence": result.confidence,
            "latency_ms": round(outcome.latency_ms, 3),
            "agree": agree,
        }

    # -- one provider call: interceptors, then guards ----------------------------------
    async def _pipeline(self, call: ModelCall) -> CallOutcome:
        chain: CallNext = self._guarded
        for interceptor in reversed(self.interceptors):
            chain = functools.partial(interceptor, next=chain)
        return await chain(call)

    async def _guarded(self, call: ModelCall) -> CallOutcome:
        slot = self._slots[call.provider]
        settings = slot.settings
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            if slot.bucket is not None:
                await slot.bucket.acquire()
            slot.breaker.before()
            slot.calls += 1
            try:
                async with asyncio.timeout(settings.timeout_s):
                    result = await self._call(slot, call)
            except (TimeoutError, errors.ProviderUnavailable) as exc:
                slot.failures += 1
                slot.breaker.failure()
                failure = (
                    exc
                    if isinstance(exc, errors.ProviderUnavailable)
                    else errors.ProviderUnavailable(
                        f"Provider {slot.name!r}: no answer within {settings.timeout_s:g} s."
                    )
                )
                wait = failure.retry_after
                if wait is None:
                    wait = settings.retry_backoff_s * 2 ** (attempt - 1)
                elif wait > settings.max_retry_after_s:
                    raise errors.ProviderUnavailable(
                        f"{failure.message} It asks to retry after {wait:g} s, more than "
                        f"max_retry_after_s = {settings.max_retry_after_s:g}.",
                        retry_after=wait,
                    ) from exc
                if attempt > settings.retries:
                    if failure is exc:
                        raise
                    raise failure from exc
                log.info(
                    "provider %s unavailable (attempt %d of %d), retrying in %.2f s",
                    slot.name,
                    attempt,
                    settings.retries + 1,
                    wait,
                )
                await self._sleep(wait)
                continue
            except errors.ModelError:
                slot.failures += 1
                slot.breaker.success()  # it answered: it is up
                raise
            except asyncio.CancelledError:
                slot.breaker.release()
                raise
            except Exception as exc:
                slot.failures += 1
                slot.breaker.success()
                log.warning("provider %s raised %s", slot.name, type(exc).__name__)
                raise errors.ModelError(
                    f"Provider {slot.name!r} failed with {type(exc).__name__} (a provider "
                    "should raise ModelError)."
                ) from exc
            slot.breaker.success()
            cost = call.spec.cost(result.tokens_in, result.tokens_out)
            latency = (time.perf_counter() - started) * 1000
            return CallOutcome(result=result, latency_ms=latency, cost_usd=cost, attempts=attempt)

    @staticmethod
    async def _call(slot: _Slot, call: ModelCall) -> base.ProviderResult:
        """One attempt: ``infer``, or ``stream`` into the call's sink."""
        sink = call.sink
        if sink is None:
            return await slot.provider.infer(call.request)
        await sink.begin()
        result: base.ProviderResult | None = None
        parts = slot.provider.stream(call.request)
        try:
            async for part in parts:
                if isinstance(part, base.ProviderResult):
                    result = part
                    break
                await sink.piece(part)
        finally:
            close = getattr(parts, "aclose", None)
            if close is not None:
                await close()
        if result is None:
            raise errors.BadModelAnswer(
                f"Provider {slot.name!r}: the stream ended without the whole answer."
            )
        await sink.end()
        return result

    @staticmethod
    def _provider_stats(slot: _Slot) -> dict[str, Any]:
        """What the provider reports of itself (a local model: its queue), if anything."""
        stats = getattr(slot.provider, "stats", None)
        return {"local": stats()} if callable(stats) else {}

    # -- reporting -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since the gateway was made: calls, cache hit rate, fallbacks,
        escalations, canary and shadow answers, redactions by kind, and per provider its
        calls, failures and circuit state."""
        c = self._counters
        looked = c.cache_hits + c.cache_misses
        return {
            "asked": c.asked,
            "answered": c.answered,
            "failed": c.failed,
            "cache": {
                "hits": c.cache_hits,
                "misses": c.cache_misses,
                "hit_rate": c.cache_hits / looked if looked else 0.0,
                "entries": self.cache.stats().entries if self.cache is not None else 0,
            },
            "fallbacks": c.fallbacks,
            "escalations": c.escalations,
            "canary": c.canary,
            "shadow": c.shadow,
            "redactions": dict(c.redactions),
            "providers": {
                name: {
                    "calls": slot.calls,
                    "failures": slot.failures,
                    "circuit": slot.breaker.state.value,
                    "circuit_opened": slot.breaker.opened,
                    "external": slot.external,
                    **self._provider_stats(slot),
                }
                for name, slot in self._slots.items()
            },
        }
