"""The OpenAI-compatible provider against the real ``llama_cpp.server`` running the
packaged SmolLM2 on a local port: chat completion, streaming (SSE), JSON-schema output,
usage tokens, and fallback when the server refuses (context too long: 400) or is stopped.

One server runs for the module (``n_ctx`` 256, so an over-long input is a real 400); the
stopped-server test starts and stops one of its own. Servers are started as subprocesses
and stopped the same way every time: terminate, wait, kill what is left. The fallback in
the chain is the in-process llama_cpp provider on the same file.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel

from flowdesk import errors
from flowdesk.models import base, config, llama
from flowdesk.models.gateway import Gateway


class Sorted(BaseModel):
    category: Literal["billing", "technical", "account", "other"]
    urgent: bool


class Server:
    def __init__(self, n_ctx: int = 512) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(llama.packaged_model_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--n_ctx",
                str(n_ctx),
                "--interrupt_requests",
                "False",
                "--verbose",
                "False",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"llama_cpp.server exited ({self.proc.returncode}): {err}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("llama_cpp.server did not answer within 90 s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(n_ctx=256)
    yield running
    running.stop()


@pytest.fixture
async def make_gateway():
    made: list[Gateway] = []

    def make(url: str, chain: list[str], task: dict[str, Any] | None = None) -> Gateway:
        data = {
            "gateway": {"cache_size": 0},
            "providers": {
                "served": {
                    "type": "openai",
                    "base_url": url,
                    "external": False,  # on this machine: no redaction needed
                    "structured_output": "json_object",  # what llama.cpp's server takes
                    "logprobs": False,
                    "retries": 0,
                    "timeout_s": 60,
                },
                "llm": {"type": "llama_cpp", "retries": 0},
            },
            "models": {
                "served": {"provider": "served", "model": "smollm2", "capabilities": ["generate"]},
                "local": {
                    "provider": "llm",
                    "model": config.PACKAGED_MODEL,
                    "capabilities": ["generate"],
                },
            },
            "tasks": {
                "reply": {
                    "capability": "generate",
                    "instructions": "Answer the customer briefly.",
                    "chain": chain,
                    "max_tokens": 24,
                    **(task or {}),
                }
            },
        }
        gw = Gateway(config.GatewayConfig.parse(copy.deepcopy(data)))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


async def test_a_chat_completion_reports_the_servers_usage(server, make_gateway):
    gw = make_gateway(server.url, ["served"])
    answer = await gw.ask("reply", "Hello, can you help me?", {"temperature": 0})
    assert answer.text and answer.provider == "served" and not answer.fallback
    assert answer.tokens_in > 5 and 0 < answer.tokens_out <= 24


async def test_streaming_from_the_server_gives_the_pieces_then_the_whole(server, make_gateway):
    gw = make_gateway(server.url, ["served"])
    chunks: list[base.Chunk] = []
    answer: base.Answer | None = None
    async for part in gw.stream("reply", "Count from one to ten.", {"temperature": 0}):
        if isinstance(part, base.Chunk):
            chunks.append(part)
        else:
            answer = part
    assert answer is not None and answer.text
    assert len(chunks) > 3 and not any(c.restart for c in chunks)
    assert "".join(c.text for c in chunks) == answer.text
    # The server sends no usage in a stream: the pieces (one token each) are counted.
    assert answer.tokens_out == len(chunks) and answer.tokens_in > 0


async def test_json_schema_output_from_the_server_validates(server, make_gateway):
    gw = make_gateway(server.url, ["served"], task={"max_tokens": 40})
    for text in ["I was charged twice this month!"]:
        answer = await gw.ask("reply", text, {"temperature": 0}, schema=Sorted)
        assert answer.provider == "served" and not answer.fallback
        assert Sorted.model_validate(answer.data) == Sorted.model_validate_json(answer.text or "")


async def test_a_4xx_from_an_overloaded_context_falls_back(server, make_gateway):
    gw = make_gateway(server.url, ["served", "local"], task={"max_tokens": 8})
    too_long = "Please read all of this. " * 50  # ~300 tokens; the server's window is 256
    answer = await gw.ask("reply", too_long)
    assert answer.provider == "llm" and answer.fallback and answer.text is not None
    providers = gw.stats()["providers"]
    assert providers["served"]["failures"] == 1 and providers["served"]["circuit"] == "closed"

    alone = make_gateway(server.url, ["served"], task={"max_tokens": 8})
    with pytest.raises(errors.ModelError, match="refused the call \\(400"):
        await alone.ask("reply", too_long)


async def test_a_stopped_server_is_unavailable_and_the_chain_falls_back(make_gateway):
    own = Server(n_ctx=256)
    try:
        gw = make_gateway(own.url, ["served", "local"], task={"max_tokens": 4})
        first = await gw.ask("reply", "Hi")
        assert first.provider == "served"
    finally:
        own.stop()
    second = await gw.ask("reply", "Hi again")
    assert second.provider == "llm" and second.fallback

    alone = make_gateway(own.url, ["served"], task={"max_tokens": 4})
    with pytest.raises(errors.ProviderUnavailable, match="cannot reach"):
        await alone.ask("reply", "Anyone there?")
