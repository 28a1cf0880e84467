"""Local generative model benchmark: the packaged SmolLM2-135M-Instruct (Q4_1 GGUF) run in
process by llama.cpp through the gateway's ``llama_cpp`` provider.

    python benchmarks/llm.py [--tokens 64] [--rounds 3]

Figures (greedy decoding, ``max_tokens`` tokens per answer, the model loaded once first):

* 1 conversation: time to first token (p50 over the rounds), decode speed (tokens after
  the first per second of streaming) and end-to-end tokens per second;
* 4 concurrent conversations: the model runs one generation at a time (one loaded model
  per process, a queue in front of it), so this shows the aggregate tokens per second and
  how time to first token grows for the ones that wait (p50 and max);
* the gateway's added latency on a streamed answer: ``gateway.stream`` against the
  provider's own ``stream`` on the same request, (a) with a provider that streams 64
  pieces at once, which isolates the gateway's own work (routing, guards, the stream sink,
  building the answer), p50 over 2,000 answers; (b) on the real model, the difference of
  the p50 time to first token and of the p50 whole answer (noisy: the model's own
  variation is far larger).

The machine is shared, so the figures are noisy; run it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from flowdesk.models import base, config, llama
from flowdesk.models.gateway import Gateway

PROMPTS = [
    "Explain to a customer how to reset their password, step by step.",
    "Write a short apology for a delayed delivery.",
    "Describe what an invoice is to a new employee.",
    "Suggest three ways to reduce support ticket volume.",
]


class Instant(base.Provider):
    """Streams 64 pieces with no model behind them."""

    name = "instant"

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        return base.ProviderResult(model="instant", version="1", text="tok " * 64)

    async def stream(self, request: base.ModelRequest) -> AsyncIterator[base.StreamPart]:
        for _ in range(64):
            yield "tok "
        yield base.ProviderResult(model="instant", version="1", text="tok " * 64, tokens_out=64)


def gateway_config(tokens: int) -> config.GatewayConfig:
    return config.GatewayConfig.parse(
        {
            "gateway": {"cache_size": 0},
            "providers": {
                "llm": {"type": "llama_cpp", "retries": 0, "timeout_s": 600},
                "instant": {"type": "python"},
            },
            "models": {
                "smol": {
                    "provider": "llm",
                    "model": config.PACKAGED_MODEL,
                    "capabilities": ["generate"],
                },
                "instant": {
                    "provider": "instant",
                    "model": "instant",
                    "capabilities": ["generate"],
                },
            },
            "tasks": {
                "reply": {"capability": "generate", "chain": ["smol"], "max_tokens": tokens},
                "instant": {"capability": "generate", "chain": ["instant"]},
            },
        }
    )


_asked = iter(range(1, 1_000_000))


def unique(text: str) -> str:
    """Each prompt differs from the one before at its start, so llama.cpp cannot reuse
    the previous prompt's evaluation: every figure includes reading the prompt."""
    return f"Request {next(_asked)}. {text}"


def request(text: str, tokens: int) -> base.ModelRequest:
    return base.ModelRequest(
        task="reply",
        capability="generate",
        text=unique(text),
        model=config.PACKAGED_MODEL,
        max_tokens=tokens,
        hints={"temperature": 0},
    )


async def timed_stream(parts: AsyncIterator[Any]) -> dict[str, float]:
    """Seconds to the first piece and to the end, and the tokens the answer reports."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async for part in parts:
        if isinstance(part, base.ProviderResult | base.Answer):
            tokens = part.tokens_out
        elif first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {
        "ttft": first - started,
        "total": end - started,
        "tokens": tokens,
        "decode": end - first,
    }


def line(label: str, value: str) -> None:
    print(f"  {label:<44} {value}")


async def main(tokens: int, rounds: int) -> None:
    gateway = Gateway(gateway_config(tokens), providers={"instant": Instant()})
    provider = gateway._slots["llm"].provider  # the provider instance the gateway uses
    assert isinstance(provider, llama.LlamaCppProvider)
    engine = provider.engine(config.PACKAGED_MODEL)
    started = time.perf_counter()
    await asyncio.to_thread(engine.wait_loaded)
    print(
        f"SmolLM2-135M-Instruct Q4_1, {tokens} tokens per answer, greedy; "
        f"model loaded in {time.perf_counter() - started:.2f} s"
    )
    await timed_stream(provider.stream(request("Hello", 8)))  # warm-up

    print("1 conversation")
    runs = [
        await timed_stream(provider.stream(request(PROMPTS[i % 4], tokens))) for i in range(rounds)
    ]
    line("time to first token, p50", f"{statistics.median(r['ttft'] for r in runs) * 1000:.0f} ms")
    decode = [(r["tokens"] - 1) / r["decode"] for r in runs if r["decode"] > 0 and r["tokens"] > 1]
    line("decode, tokens/s (p50)", f"{statistics.median(decode):.1f}")
    e2e = sum(r["tokens"] for r in runs) / sum(r["total"] for r in runs)
    line("end to end, tokens/s", f"{e2e:.1f}")

    print("4 concurrent conversations (one model, its queue in front)")
    ttfts: list[float] = []
    total_tokens = 0
    wall = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(timed_stream(provider.stream(request(p, tokens))) for p in PROMPTS)
        )
        wall += time.perf_counter() - t0
        ttfts += [r["ttft"] for r in results]
        total_tokens += sum(int(r["tokens"]) for r in results)
    line("aggregate tokens/s", f"{total_tokens / wall:.1f}")
    line(
        "time to first token, p50 / max",
        f"{statistics.median(ttfts) * 1000:.0f} ms / {max(ttfts) * 1000:.0f} ms",
    )

    print("gateway's added latency on a streamed answer")
    instant = gateway._slots["instant"].provider
    req = base.ModelRequest(task="instant", capability="generate", text="hi", model="instant")
    direct: list[float] = []
    through: list[float] = []
    for _ in range(2000):
        direct.append((await timed_stream(instant.stream(req)))["total"])
        through.append((await timed_stream(gateway.stream("instant", "hi")))["total"])
    added = statistics.median(through) - statistics.median(direct)
    line("instant provider, 64 pieces: added p50", f"{added * 1e6:.0f} us per answer")
    model_direct: list[dict[str, float]] = []
    model_gateway: list[dict[str, float]] = []
    for i in range(rounds * 2):
        text = PROMPTS[i % 4]
        model_direct.append(await timed_stream(provider.stream(request(text, tokens))))
        model_gateway.append(
            await timed_stream(gateway.stream("reply", unique(text), {"temperature": 0}))
        )
    for key, label in (("ttft", "time to first token"), ("total", "whole answer")):
        d = statistics.median(r[key] for r in model_direct)
        g = statistics.median(r[key] for r in model_gateway)
        line(
            f"real model, {label} p50 direct / gateway",
            f"{d * 1000:.0f} ms / {g * 1000:.0f} ms ({(g - d) * 1000:+.1f} ms)",
        )
    await gateway.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds))
