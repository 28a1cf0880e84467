"""The llama_cpp provider on the real packaged SmolLM2-135M-Instruct, in this process.

The model is loaded once for the session (`engine`); every gateway in these tests shares
that one loaded model, as providers in one process do. Generations are short
(``max_tokens`` 16-120) and greedy (temperature 0). Queue and time-limit tests hold the
engine with `Engine.paused` so they never race the model.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, field_validator
from typer.testing import CliRunner

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.cli import cli
from flowdesk.models import base, config, llama
from flowdesk.models.gateway import Gateway

PACKAGED = config.PACKAGED_MODEL


class Triage(BaseModel):
    category: Literal["billing", "technical", "account", "other"]
    urgent: bool
    reply: str = Field(max_length=160)  # bounded in the grammar too: the JSON fits max_tokens


class Sorted(BaseModel):
    category: Literal["billing", "technical", "account", "other"]
    urgent: bool


class Picky(BaseModel):
    """A schema the grammar cannot enforce: only the fallback's summary passes."""

    summary: str

    @field_validator("summary")
    @classmethod
    def _only_the_fallback(cls, value: str) -> str:
        if value != "written by the fallback":
            raise ValueError("this summary is not accepted")
        return value


class Fallback(base.Provider):
    """An in-process stand-in for a second model in the chain."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        self.calls += 1
        return base.ProviderResult(
            model="fallback", version="1", text=json.dumps({"summary": "written by the fallback"})
        )


@pytest.fixture(scope="session")
def engine() -> Any:
    shared = llama.acquire(llama.packaged_model_path())
    assert shared.wait_loaded(120)
    yield shared
    llama.release(shared)


@pytest.fixture
async def make_gateway(engine):
    made: list[Gateway] = []

    def make(data: dict[str, Any] | None = None, **kw: Any) -> Gateway:
        if data is None:
            gw = Gateway.default(**kw)
        else:
            kw.setdefault("providers", {"backup": Fallback("backup")})
            gw = Gateway(config.GatewayConfig.parse(data), **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


def setup(
    chain: list[str] | None = None, task: dict[str, Any] | None = None, **llm: Any
) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "gateway": {"cache_size": 0},
            "providers": {
                "llm": {"type": "llama_cpp", "retries": 0, **llm},
                "backup": {"type": "python"},
            },
            "models": {
                "smol": {
                    "provider": "llm",
                    "model": PACKAGED,
                    "capabilities": ["generate", "classify"],
                },
                "backup": {"provider": "backup", "model": "fallback", "capabilities": ["generate"]},
            },
            "tasks": {
                "triage": {
                    "capability": "generate",
                    "instructions": "Triage the customer's support message.",
                    "chain": chain or ["smol"],
                    "max_tokens": 120,
                    **(task or {}),
                },
                "sort": {
                    "capability": "classify",
                    "labels": ["billing", "technical", "other"],
                    "chain": ["smol"],
                    "max_tokens": 40,
                },
            },
        }
    )


MESSAGES = [
    "I was charged twice for my subscription this month.",
    "The app crashes every time I open the settings page.",
    "How do I change the e-mail address on my account?",
    "Your service has been down for three hours and we are losing sales!",
    "Just wanted to say thanks for the quick help yesterday.",
]


async def test_the_default_gateway_generates_with_the_packaged_model_in_process(
    make_gateway, engine
):
    gw = make_gateway()
    answer = await gw.ask(
        "generate", "Say hello to Ada in one sentence.", {"max_tokens": 24, "temperature": 0}
    )

    assert answer.text and answer.text.strip()
    assert (answer.provider, answer.model) == ("llm", PACKAGED)
    assert answer.tokens_in > 10 and 0 < answer.tokens_out <= 24 and answer.cost_usd == 0.0
    # One loaded model per process: the gateway used the session's engine.
    assert [e for e in llama.loaded() if e.path == engine.path] == [engine]
    assert engine.users >= 2


async def test_a_call_waits_for_the_model_off_the_event_loop(make_gateway, engine, wait_until):
    gw = make_gateway()
    with engine.paused():
        before = engine.generated
        asking = asyncio.create_task(gw.ask("generate", "Hi!", {"max_tokens": 8}))
        # The loop keeps running this test while the call waits for the model's thread.
        await wait_until(lambda: engine.pending == 1, what="the call is queued")
        assert not asking.done()
    answer = await asyncio.wait_for(asking, 60)
    assert answer.text is not None and engine.generated == before + 1


async def test_classification_is_constrained_to_the_labels(make_gateway):
    gw = make_gateway(setup())
    for text in MESSAGES[:1]:
        answer = await gw.ask("sort", text)
        assert answer.label in ("billing", "technical", "other")
        assert answer.confidence is not None and 0.0 <= answer.confidence <= 1.0


async def test_structured_output_from_the_real_model_always_validates(make_gateway, engine):
    gw = make_gateway(setup())
    for text, schema in [(MESSAGES[0], Triage), (MESSAGES[1], Sorted), (MESSAGES[3], Sorted)]:
        answer = await gw.ask("triage", text, {"temperature": 0, "max_tokens": 200}, schema=schema)
        triage = schema.model_validate(answer.data)  # what ctx.model hands the workflow
        assert answer.text is not None and schema.model_validate_json(answer.text) == triage
        assert answer.provider == "llm" and answer.tokens_out > 0


async def test_an_answer_that_fails_validation_is_retried_once_then_falls_back(
    make_gateway, engine
):
    backup = Fallback("backup")
    gw = make_gateway(setup(chain=["smol", "backup"]), providers={"backup": backup})
    before = engine.generated
    answer = await gw.ask("triage", MESSAGES[0], {"max_tokens": 16}, schema=Picky)
    assert answer.data == {"summary": "written by the fallback"} and answer.fallback
    assert engine.generated == before + 2  # the first answer and the one retry
    assert backup.calls == 1

    alone = make_gateway(setup(chain=["smol"]))
    with pytest.raises(errors.AnswerRejected, match="twice outside Picky"):
        await alone.ask("triage", MESSAGES[0], {"max_tokens": 16}, schema=Picky)


async def test_ctx_model_returns_the_instance_streams_and_replays_it_whole(
    app, make_gateway, engine, wait_status
):
    app.gateway = make_gateway(setup())
    chunks: list[base.Chunk] = []
    seen: list[Any] = []

    async def on_chunk(chunk: base.Chunk) -> None:
        chunks.append(chunk)

    @app.workflow("triage")
    async def triage(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        result = await ctx.model("triage", text, schema=Sorted, on_chunk=on_chunk, temperature=0)
        seen.append(result)
        await ctx.wait_signal("go")  # parks; the signal replays the workflow from the top
        return result.model_dump()

    before = engine.generated
    async with app, app.worker():
        handle = await app.start("triage", {"text": MESSAGES[1]})
        await wait_status(app, handle.id, RunStatus.WAITING)
        streamed = list(chunks)
        await app.signal(handle.id, "go")
        result = await app.result(handle.id, timeout=60)
        steps = await app.steps(handle.id)

    assert engine.generated == before + 1  # the replay did not call the model
    assert len(seen) == 2 and all(isinstance(r, Sorted) for r in seen) and seen[0] == seen[1]
    assert result == seen[0].model_dump()
    assert chunks == streamed and len(streamed) > 3  # nothing streamed on replay
    step = steps[0]
    assert step.name == "model:triage" and step.output["data"] == result
    assert "".join(c.text for c in streamed) == step.output["text"]


async def test_the_queue_is_bounded_and_a_full_queue_falls_back(make_gateway, wait_until):
    # n_ctx 1024 is another engine than the session's, with a queue of one.
    data = setup(chain=["smol", "backup"], max_queue=1, n_ctx=1024)
    backup = Fallback("backup")
    gw = make_gateway(data, providers={"backup": backup})
    provider = gw.stats()["providers"]["llm"]
    assert provider["external"] is False
    engine = llama.acquire(llama.packaged_model_path(), n_ctx=1024, max_queue=1)
    try:
        with engine.paused():
            first = asyncio.create_task(gw.ask("triage", "one", {"max_tokens": 4}))
            second = asyncio.create_task(gw.ask("triage", "two", {"max_tokens": 4}))
            await wait_until(lambda: engine.pending == 2, what="one running, one waiting")
            local = gw.stats()["providers"]["llm"]["local"][PACKAGED]
            assert (local["pending"], local["max_queue"]) == (2, 1)
            third = await gw.ask("triage", "three", {"max_tokens": 4})
            assert third.provider == "backup" and third.fallback and backup.calls == 1

            alone = make_gateway(setup(max_queue=1, n_ctx=1024))
            with pytest.raises(errors.ModelOverloaded, match=r"max_queue = 1"):
                await alone.ask("triage", "four", {"max_tokens": 4})
        answers = await asyncio.wait_for(asyncio.gather(first, second), 60)
        assert [a.provider for a in answers] == ["llm", "llm"]
        await wait_until(lambda: engine.pending == 0)
    finally:
        llama.release(engine)


async def test_the_time_limit_stops_a_generation_that_has_not_finished(
    make_gateway, engine, wait_until
):
    gw = make_gateway(setup(task={"answer_timeout_s": 0.3}))
    with engine.paused():
        before = engine.generated
        with pytest.raises(errors.AnswerTimeout, match="answer_timeout_s = 0.3"):
            await gw.ask("triage", "Tell me a long story.", {"max_tokens": 120})
        assert engine.pending == 1
    await wait_until(lambda: engine.pending == 0, what="the abandoned call is dropped")
    assert engine.generated == before  # it never ran


async def test_a_long_answer_is_refused_while_it_streams(make_gateway):
    gw = make_gateway(setup(task={"max_answer_chars": 20}))
    chunks: list[base.Chunk] = []

    async def sink(chunk: base.Chunk) -> None:
        chunks.append(chunk)

    with pytest.raises(errors.AnswerRejected, match="max_answer_chars = 20"):
        await gw.ask("triage", "Describe the ocean in detail.", {"max_tokens": 120}, on_chunk=sink)
    assert 0 < sum(len(c.text) for c in chunks) <= 20


def test_a_missing_gguf_file_is_a_configuration_error(tmp_path):
    data = setup()
    data["models"]["smol"]["model"] = str(tmp_path / "nope.gguf")
    with pytest.raises(errors.ConfigurationError, match="models.smol: No GGUF file at"):
        Gateway(config.GatewayConfig.parse(data), providers={"backup": Fallback("backup")})


def test_models_ask_prints_the_answer_with_model_provider_tokens_latency_and_cost(
    engine, tmp_path, monkeypatch
):
    monkeypatch.delenv("FLOWDESK_MODELS_CONFIG", raising=False)
    runner = CliRunner()
    result = runner.invoke(
        cli, ["models", "ask", "generate", "Say hi.", "--max-tokens", "8", "--json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["provider"] == "llm" and answer["model"] == PACKAGED
    assert answer["tokens_out"] > 0 and answer["latency_ms"] > 0 and answer["cost_usd"] == 0
    assert answer["text"]

    result = runner.invoke(cli, ["models", "ask", "generate", "Say hi.", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert f"model {PACKAGED}" in result.stderr and "provider llm" in result.stderr
    assert " in, " in result.stderr and " ms · 0.000000 USD" in result.stderr

    toml = tmp_path / "models.toml"
    gguf = llama.packaged_model_path()  # any GGUF file, by a path under models_dir
    toml.write_text(
        f'[providers.llm]\ntype = "llama_cpp"\nmodels_dir = "{gguf.parent}"\n'
        f'[models.smol]\nprovider = "llm"\nmodel = "{gguf.name}"\ncapabilities = ["generate"]\n'
        '[tasks.triage]\ncapability = "generate"\nchain = ["smol"]\nmax_tokens = 120\n'
    )
    result = runner.invoke(
        cli,
        [
            "models",
            "ask",
            "triage",
            MESSAGES[0],
            "--config",
            str(toml),
            "--provider",
            "llm",
            "--schema",
            "test_llm_local:Sorted",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    Sorted.model_validate(answer["data"])
    assert (answer["provider"], answer["model"]) == ("llm", gguf.name)

    result = runner.invoke(
        cli,
        [
            "models",
            "ask",
            "triage",
            "x",
            "--config",
            str(toml),
            "--schema",
            "test_llm_local:nothing",
        ],
    )
    assert result.exit_code == 1 and "cannot load it" in result.stderr
