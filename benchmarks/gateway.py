"""Model gateway benchmark: what the gateway itself adds to a model call.

    python benchmarks/gateway.py [--calls 20000] [--postgres postgresql://postgres@127.0.0.1:5432]

The model is an in-process provider that answers at once, so what is timed is the
gateway's own work: task lookup, hint checks, routing, version choice, the provider's
guards (breaker, timeout scope), cost, building the `Answer`, and the cache. Each figure
is per call, from ``time.perf_counter_ns`` around one awaited call, after a warm-up:

* direct: ``await provider.infer(request)`` (the floor);
* gateway, cache off: ``await gateway.ask(task, text)`` on a task with ``cache_ttl_s = 0``;
* gateway, cache hit: the same input asked again (the LRU answers);
* gateway, cache off, one interceptor: a pass-through interceptor in the pipeline;
* redaction: what `pii.Redactor.redact` costs on a ~300-character ticket (paid only when
  a chain reaches an external provider);

and the overhead, gateway p50 minus direct p50 (target: under 0.2 ms).

The accounting section (`accounting`) times what the ledger and budget interceptors add
(``flowdesk.models.rollout.wire``: prices, the ledger, a task budget and a shared rate
limit), on a SQLite file in a temporary folder (and with ``--postgres URL`` on a temporary
database there):

* flags + ledger: ``gateway.ask`` p50 through the wired stack with no budget or limit
  (the flag check and the ledger, whose row is queued on the group-commit writer without
  waiting), and the time to commit those rows afterwards, per call;
* ledger + budget + rate limit, one caller: the reservation is one awaited transaction
  before each call (a commit), so this is the per-call price of exact shared limits;
* the same with 64 concurrent callers: answers per second, the reservations sharing
  group commits.

The last section, local-classifier throughput with and without micro-batching at 64
concurrent callers, runs once ``flowdesk.models.local`` exists (see `local_throughput`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import flowdesk
from flowdesk.models import base, config, pii, rollout
from flowdesk.models.gateway import CallNext, CallOutcome, Gateway, ModelCall

LABELS = ["billing", "technical", "account", "other"]
TICKET = (
    "Hello, my invoice for March shows the annual plan twice and my card was charged two "
    "times. Please refund the second charge to the card ending 1111 or to my account. "
    "You can reach me at jane.roe@example.org or +1 415-555-2671. Thanks, Jane"
)


class Instant(base.Provider):
    """Answers at once, as a model that costs nothing would."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        return base.ProviderResult(
            model=request.model,
            version=request.version or "1",
            label=request.labels[0],
            confidence=0.93,
            tokens_in=40,
            tokens_out=3,
        )


def make_config(cache_ttl: float) -> config.GatewayConfig:
    return config.GatewayConfig.parse(
        {
            "providers": {"instant": {"type": "python"}},
            "models": {"clf": {"provider": "instant", "model": "clf", "version": "1"}},
            "tasks": {
                "ticket": {
                    "capability": "classify",
                    "labels": LABELS,
                    "chain": ["clf"],
                    "confidence_threshold": 0.5,
                    "cache_ttl_s": cache_ttl,
                }
            },
        }
    )


async def timed(fn: Callable[[], Awaitable[Any]], calls: int) -> list[float]:
    """Microseconds per call."""
    for _ in range(min(2000, calls)):
        await fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def report(name: str, values: list[float]) -> float:
    p50, p99, mean = pct(values, 50), pct(values, 99), statistics.mean(values)
    print(f"  {name:<38} p50 {p50:8.1f} us   p99 {p99:8.1f} us   mean {mean:8.1f} us")
    return p50


async def passthrough(call: ModelCall, next: CallNext) -> CallOutcome:
    return await next(call)


async def overhead(calls: int) -> None:
    provider = Instant("instant")
    request = base.ModelRequest(
        task="ticket",
        capability="classify",
        text=TICKET,
        model="clf",
        version="1",
        labels=tuple(LABELS),
    )
    print(f"gateway overhead per call ({calls} calls each, in-process model)")
    direct = report("direct provider.infer", await timed(lambda: provider.infer(request), calls))

    async with Gateway(make_config(0), providers={"instant": provider}) as gw:
        uncached = report(
            "gateway, cache off", await timed(lambda: gw.ask("ticket", TICKET), calls)
        )
    async with Gateway(make_config(3600), providers={"instant": provider}) as gw:
        report("gateway, cache hit", await timed(lambda: gw.ask("ticket", TICKET), calls))
        hit_rate = gw.stats()["cache"]["hit_rate"]
    async with Gateway(
        make_config(0), providers={"instant": provider}, interceptors=[passthrough]
    ) as gw:
        report(
            "gateway, cache off, 1 interceptor",
            await timed(lambda: gw.ask("ticket", TICKET), calls),
        )
    redactor = pii.Redactor(phone_regions=["US"])

    async def redact() -> None:
        redactor.redact(TICKET)

    report(f"redaction ({len(TICKET)} chars)", await timed(redact, max(200, calls // 20)))
    print(f"  cache hit rate in the cache-hit run: {hit_rate:.4f}")
    print(f"  overhead (gateway cache off p50 - direct p50): {(uncached - direct) / 1000:.4f} ms")


# -- the ledger and budget interceptors -----------------------------------------------


def accounting_config(limits: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "providers": {"instant": {"type": "python"}},
        "models": {"clf": {"provider": "instant", "model": "clf", "version": "1"}},
        "tasks": {
            "ticket": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["clf"],
                "cache_ttl_s": 0,
            }
        },
        "prices": {"clf": {"per_1k_in": 0.15, "per_1k_out": 0.6}},
        "drift": {"tasks": []},  # drift sampling is not what is timed here
    }
    if limits:
        data["budgets"] = [{"scope": "task", "name": "ticket", "limit_usd": 1e6}]
        data["limits"] = [{"scope": "model", "name": "clf", "calls": 10**9, "per_s": 60}]
    return data


async def accounting_store(label: str, url: str, calls: int) -> None:
    print(f"ledger and budget interceptors per call, {label}")
    provider = Instant("instant")
    app = flowdesk.App(url)
    stack = rollout.wire(app, accounting_config(False), providers={"instant": provider})
    async with app:
        values = await timed(lambda: stack.gateway.ask("ticket", TICKET), calls)
        t0 = time.perf_counter()
        await stack.flush()
        flush_us = (time.perf_counter() - t0) / (calls + min(2000, calls)) * 1e6
    await stack.gateway.close()
    report("wired: flags + ledger, no budget", values)
    print(f"  {'  + committing those rows afterwards':<38} {flush_us:8.1f} us per call (amortized)")

    few = max(200, calls // 40)
    app = flowdesk.App(url)
    stack = rollout.wire(app, accounting_config(True), providers={"instant": provider})
    async with app:
        values = await timed(lambda: stack.gateway.ask("ticket", TICKET), few)
        report("ledger + budget + rate limit, 1 caller", values)
        done = 0

        async def caller() -> None:
            nonlocal done
            for _ in range(few // 8):
                await stack.gateway.ask("ticket", TICKET)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(64)))
        elapsed = time.perf_counter() - t0
        await stack.flush()
    await stack.gateway.close()
    print(f"  {'ledger + budget + rate limit, 64 callers':<38} {done / elapsed:8.0f} answers/s")


async def accounting(calls: int, postgres: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="flowdesk-gateway-bench-") as tmp:
        await accounting_store("SQLite (a file, synchronous=full)", f"sqlite:///{tmp}/g.db", calls)
    if not postgres:
        return
    import psycopg
    from psycopg import sql

    parts = urlsplit(postgres)
    name = f"flowdesk_bench_gateway_{secrets.token_hex(6)}"
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
        await accounting_store(f"PostgreSQL ({parts.hostname}, database {name})", url, calls)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# ---------------------------------------------------------------------------------------
# LOCAL CLASSIFIER THROUGHPUT (with / without micro-batching, 64 concurrent callers)
#
# Trains a Banking77 classifier into a temporary registry (TF-IDF: seconds; with
# --embeddings, the default TF-IDF + MiniLM features: about two minutes), then sends the
# same 64 concurrent callers through the provider with micro-batching on and off. Set
# FLOWDESK_BENCH_MODELS_DIR and FLOWDESK_BENCH_TASK to measure an existing model instead.
# ---------------------------------------------------------------------------------------

BANKING77 = Path(__file__).resolve().parent.parent / "data" / "banking77" / "train.csv"


async def throughput(
    provider: base.Provider, requests: list[base.ModelRequest], callers: int, seconds: float
) -> tuple[float, list[float]]:
    """Answers per second with ``callers`` concurrent callers for ``seconds``, and each
    answer's latency."""
    done = 0
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        n = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await provider.infer(requests[n % len(requests)])
            latencies.append(time.perf_counter() - t0)
            done += 1
            n += callers

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return done / (time.perf_counter() - started), latencies


def trained_model(features: str) -> tuple[str, str, list[str]]:
    """A registry folder, its task, and sample texts: given by the environment, or trained
    here on Banking77."""
    from flowdesk.models import registry, training

    examples = training.load_examples(BANKING77, label_column="category")
    texts = list(examples.texts[:2000])
    models_dir = os.environ.get("FLOWDESK_BENCH_MODELS_DIR")
    task = os.environ.get("FLOWDESK_BENCH_TASK")
    if models_dir and task:
        return models_dir, task, texts
    models_dir = tempfile.mkdtemp(prefix="flowdesk-bench-models-")
    started = time.perf_counter()
    result = training.train(examples, features=features)  # type: ignore[arg-type]
    registry.Registry(models_dir).register("banking77", result.classifier, result.meta)
    print(
        f"  trained banking77 ({features}) in {time.perf_counter() - started:.0f} s: "
        f"held-out accuracy {result.metrics.accuracy:.4f}"
    )
    return models_dir, "banking77", texts


async def local_throughput(seconds: float, features: str) -> None:
    print(f"local classifier throughput, 64 concurrent callers ({features})")
    if importlib.util.find_spec("sklearn") is None:
        print("  skipped: scikit-learn is not installed (pip install 'flowdesk[models]')")
        return
    from flowdesk.models import local

    models_dir, task, texts = trained_model(features)
    requests = [
        base.ModelRequest(task=task, capability="classify", text=t, model=task) for t in texts
    ]
    rates: dict[str, float] = {}
    for name, batching in (("micro-batching off", False), ("micro-batching on", True)):
        provider = local.LocalClassifierProvider(
            models_dir=models_dir, task=task, batching_enabled=batching
        )
        try:
            await provider.infer(requests[0])  # load the model first
            rate, lat = await throughput(provider, requests, 64, seconds)
        finally:
            await provider.close()
        lat.sort()
        rates[name] = rate
        print(
            f"  {name:<20} {rate:10.0f} answers/s   p50 {lat[len(lat) // 2] * 1e3:7.1f} ms"
            f"   p99 {lat[int(len(lat) * 0.99)] * 1e3:7.1f} ms"
        )
    print(
        f"  speed-up from micro-batching: "
        f"{rates['micro-batching on'] / rates['micro-batching off']:.1f}x (target >= 3x)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--postgres", metavar="URL", help="also time the accounting there")
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="measure the default classifier (TF-IDF + sentence embeddings), not TF-IDF",
    )
    args = parser.parse_args()
    await overhead(args.calls)
    await accounting(args.calls, args.postgres)
    await local_throughput(args.seconds, "tfidf+embeddings" if args.embeddings else "tfidf")


if __name__ == "__main__":
    asyncio.run(main())
