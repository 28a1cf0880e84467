"""Structured output, streaming and guardrails of the gateway over the two HTTP wire
protocols, against `ModelServer` (a local server speaking the OpenAI-compatible and
Anthropic APIs, with server-sent events; see test_model_http.py).

The real llama.cpp, in process and as an OpenAI-compatible server, is in
test_llm_local.py and test_llm_server.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from test_model_http import API_KEY, ModelServer, Reply

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.engine.tasks import Assignees
from flowdesk.humans.inbox import Inbox
from flowdesk.models import base, config, http, structured
from flowdesk.models.gateway import Gateway
from flowdesk.store.people import Person

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
ENV = {"TEST_OA_KEY": API_KEY, "TEST_AN_KEY": API_KEY}


class Ticket(BaseModel):
    category: Literal["billing", "technical", "other"]
    urgent: bool
    summary: str = Field(max_length=80)


GOOD = {"category": "billing", "urgent": True, "summary": "Charged twice"}


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
def model_server():
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
async def make_gateway():
    made: list[Gateway] = []

    def make(data: dict[str, Any]) -> Gateway:
        gw = Gateway(config.GatewayConfig.parse(data), env=ENV, sleep=no_sleep)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.close()


def setup(
    server: ModelServer, chain: list[str], task: dict[str, Any] | None = None, **oa: Any
) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "gateway": {"cache_size": 0},
            "providers": {
                "oa": {
                    "type": "openai",
                    "base_url": server.url + "/v1",
                    "api_key_env": "TEST_OA_KEY",
                    "retries": 0,
                    **oa,
                },
                "an": {
                    "type": "anthropic",
                    "base_url": server.url,
                    "api_key_env": "TEST_AN_KEY",
                    "retries": 0,
                },
            },
            "models": {
                "gpt": {"provider": "oa", "model": "gpt-test", "capabilities": ["generate"]},
                "claude": {"provider": "an", "model": "claude-test", "capabilities": ["generate"]},
            },
            "tasks": {
                "reply": {
                    "capability": "generate",
                    "instructions": "Triage the ticket.",
                    "chain": chain,
                    **(task or {}),
                }
            },
        }
    )


async def collect(gw: Gateway, *args: Any, **kw: Any) -> tuple[list[base.Chunk], base.Answer]:
    chunks: list[base.Chunk] = []
    answer: base.Answer | None = None
    async for part in gw.stream(*args, **kw):
        if isinstance(part, base.Chunk):
            chunks.append(part)
        else:
            answer = part
    assert answer is not None
    return chunks, answer


# -- structured output -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["json_schema", "json_object"])
async def test_openai_sends_the_schema_as_response_format_and_answers_a_validated_instance(
    model_server, make_gateway, mode
):
    model_server.script(CHAT, Reply(content=json.dumps(GOOD)))
    gw = make_gateway(setup(model_server, ["gpt"], structured_output=mode))
    answer = await gw.ask("reply", "I was charged twice!", schema=Ticket)

    assert answer.data == GOOD and Ticket.model_validate(answer.data).urgent is True
    assert answer.provider == "oa" and answer.tokens_in > 0 and answer.tokens_out > 0
    [seen] = model_server.seen(CHAT)
    fmt = seen.body["response_format"]
    if mode == "json_schema":
        assert fmt == {
            "type": "json_schema",
            "json_schema": {"name": "Ticket", "schema": Ticket.model_json_schema()},
        }
    else:
        assert fmt == {"type": "json_object", "schema": Ticket.model_json_schema()}
    system = seen.body["messages"][0]["content"]
    assert system.startswith("Triage the ticket.") and '"category"' in system


async def test_anthropic_structured_output_is_one_forced_tool_call(model_server, make_gateway):
    model_server.script(MESSAGES, Reply(content=json.dumps(GOOD)))
    gw = make_gateway(setup(model_server, ["claude"]))
    answer = await gw.ask("reply", "I was charged twice!", schema=Ticket)

    assert answer.data == GOOD and answer.provider == "an"
    [seen] = model_server.seen(MESSAGES)
    assert seen.body["tools"] == [
        {
            "name": "Ticket",
            "description": "Record the answer, following the schema exactly.",
            "input_schema": Ticket.model_json_schema(),
        }
    ]
    assert seen.body["tool_choice"] == {"type": "tool", "name": "Ticket"}


async def test_an_invalid_answer_is_asked_again_once_with_the_validation_error(
    model_server, make_gateway
):
    bad = {"category": "refund", "urgent": "very", "summary": "secret-value-123"}
    model_server.script(CHAT, Reply(content=json.dumps(bad)), Reply(content=json.dumps(GOOD)))
    gw = make_gateway(setup(model_server, ["gpt", "claude"]))
    answer = await gw.ask("reply", "I was charged twice!", schema=Ticket)

    assert answer.data == GOOD and answer.provider == "oa" and not answer.fallback
    first, second = model_server.seen(CHAT)
    assert [m["role"] for m in first.body["messages"]] == ["system", "user"]
    roles = [m["role"] for m in second.body["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second.body["messages"][2]["content"] == json.dumps(bad)
    correction = second.body["messages"][3]["content"]
    assert "category" in correction and "urgent" in correction
    assert "secret-value-123" not in correction  # the error names fields, not values
    assert answer.tokens_out == sum(1 + len(json.dumps(x)) // 4 for x in (bad, GOOD))
    assert model_server.seen(MESSAGES) == []


async def test_a_second_invalid_answer_is_refused_and_the_chain_falls_back(
    model_server, make_gateway
):
    model_server.script(CHAT, Reply(content="not json"), Reply(content='{"category": "x"}'))
    model_server.script(MESSAGES, Reply(content=json.dumps(GOOD)))
    gw = make_gateway(setup(model_server, ["gpt", "claude"]))
    answer = await gw.ask("reply", "I was charged twice!", schema=Ticket)

    assert answer.data == GOOD and answer.provider == "an" and answer.fallback
    assert len(model_server.seen(CHAT)) == 2 and len(model_server.seen(MESSAGES)) == 1


async def test_when_no_model_answers_within_the_schema_the_error_says_so(
    model_server, make_gateway
):
    model_server.script(CHAT, *[Reply(content='{"urgent": true}')] * 2)
    gw = make_gateway(setup(model_server, ["gpt"]))
    with pytest.raises(errors.AnswerRejected) as caught:
        await gw.ask("reply", "I was charged twice!", schema=Ticket)
    message = str(caught.value)
    assert "Every model for task 'reply' failed" in message
    assert "answered task 'reply' twice outside Ticket" in message
    assert "category: Field required" in message


async def test_a_schema_needs_a_generate_task_and_a_pydantic_model(model_server, make_gateway):
    data = setup(model_server, ["gpt"])
    data["models"]["gpt"]["capabilities"] = ["generate", "classify"]
    data["tasks"]["sort"] = {"capability": "classify", "labels": ["a", "b"], "chain": ["gpt"]}
    gw = make_gateway(data)
    with pytest.raises(errors.ConfigurationError, match="needs a generate task"):
        await gw.ask("sort", "text", schema=Ticket)
    with pytest.raises(errors.ConfigurationError, match="must be a Pydantic model class"):
        await gw.ask("reply", "text", schema=dict)  # type: ignore[arg-type]
    assert model_server.requests == []


# -- the parsers, whatever the model writes ---------------------------------------------

TICKETS = st.builds(
    Ticket,
    category=st.sampled_from(["billing", "technical", "other"]),
    urgent=st.booleans(),
    summary=st.text(max_size=80),
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            json.dumps,
            st.dictionaries(
                st.sampled_from(["category", "urgent", "summary", "extra"]),
                st.one_of(st.text(max_size=90), st.booleans(), st.integers(), st.none()),
            ),
        ),
    )
)
def test_any_reply_is_a_valid_instance_or_a_bad_answer_that_names_no_value(text):
    try:
        ticket = structured.validate(text, Ticket)
    except errors.BadModelAnswer as exc:
        assert "Ticket" in exc.message or "JSON" in exc.message
        return
    assert isinstance(ticket, Ticket) and Ticket.model_validate(ticket.model_dump()) == ticket


@settings(max_examples=100, deadline=None)
@given(TICKETS, st.booleans())
def test_a_valid_reply_parses_back_whole_fenced_or_not(ticket, fenced):
    text = ticket.model_dump_json()
    if fenced:
        text = f"```json\n{text}\n```"
    assert structured.validate(text, Ticket) == ticket


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from(["message_start", "content_block_delta", "ping"])),
            st.text(alphabet=st.characters(blacklist_characters="\r\n"), max_size=40),
        ),
        max_size=8,
    )
)
def test_server_sent_events_parse_back_as_they_were_sent(events):
    lines: list[str] = []
    for event, data in events:
        if event is not None:
            lines.append(f"event: {event}")
        lines += [f"data: {data}", ""]
    assert http.sse_events(lines) == list(events)


# -- streaming ---------------------------------------------------------------------------


async def test_openai_streams_server_sent_events_and_reports_the_usage(model_server, make_gateway):
    gw = make_gateway(setup(model_server, ["gpt"]))
    chunks, answer = await collect(gw, "reply", "Hello there, streaming world")

    assert answer.text == "Echo: Hello there, streaming world"
    assert len(chunks) > 5 and not any(c.restart for c in chunks)
    assert "".join(c.text for c in chunks) == answer.text
    [seen] = model_server.seen(CHAT)
    assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
    assert answer.tokens_out == len(chunks) and answer.tokens_in > 0


async def test_anthropic_streams_text_and_a_structured_answer_as_tool_input(
    model_server, make_gateway
):
    gw = make_gateway(setup(model_server, ["claude"]))
    chunks, answer = await collect(gw, "reply", "Hello there")
    assert answer.text == "Echo: Hello there" == "".join(c.text for c in chunks)
    assert answer.tokens_in > 0 and answer.tokens_out == len(chunks)

    model_server.script(MESSAGES, Reply(content=json.dumps(GOOD)))
    chunks, answer = await collect(gw, "reply", "I was charged twice!", schema=Ticket)
    assert answer.data == GOOD and json.loads("".join(c.text for c in chunks)) == GOOD
    assert model_server.seen(MESSAGES)[-1].body["stream"] is True


async def test_an_error_mid_stream_restarts_the_answer_on_the_next_model(
    model_server, make_gateway
):
    model_server.script(CHAT, Reply(content="This answer breaks off", stream_error=True))
    gw = make_gateway(setup(model_server, ["gpt", "claude"]))
    chunks, answer = await collect(gw, "reply", "Hello")

    restarts = [i for i, c in enumerate(chunks) if c.restart]
    assert len(restarts) == 1 and restarts[0] == 2  # two pieces, then the error
    assert "".join(c.text for c in chunks[:2]) == "This a"
    assert "".join(c.text for c in chunks[3:]) == answer.text == "Echo: Hello"
    assert answer.provider == "an" and answer.fallback


async def test_anthropic_error_event_is_unavailable_and_falls_back(model_server, make_gateway):
    model_server.script(MESSAGES, Reply(content="Breaks off here", stream_error=True))
    gw = make_gateway(setup(model_server, ["claude", "gpt"]))
    chunks, answer = await collect(gw, "reply", "Hello")
    assert answer.provider == "oa" and answer.text == "Echo: Hello"
    assert sum(c.restart for c in chunks) == 1


async def test_streamed_text_has_pii_restored_even_when_a_placeholder_is_cut(
    model_server, make_gateway
):
    gw = make_gateway(setup(model_server, ["gpt"]))
    text = "Write to jane.doe@example.com about it"
    chunks, answer = await collect(gw, "reply", text)

    [seen] = model_server.seen(CHAT)
    assert "jane.doe@example.com" not in json.dumps(seen.body)  # redacted before it left
    assert answer.text == "Echo: " + text and answer.redactions == {"email": 1}
    assert "".join(c.text for c in chunks) == answer.text
    assert not any("<" in c.text for c in chunks)  # no half placeholder ever shown


# -- guardrails --------------------------------------------------------------------------


async def test_an_answer_longer_than_allowed_is_refused_and_never_passed_on(
    model_server, make_gateway
):
    long = "x" * 200
    model_server.script(CHAT, Reply(content=long), Reply(content=long))
    gw = make_gateway(setup(model_server, ["gpt", "claude"], task={"max_answer_chars": 50}))
    answer = await gw.ask("reply", "Hello")
    assert answer.provider == "an" and answer.fallback and answer.text == "Echo: Hello"

    chunks, answer = await collect(gw, "reply", "Hello")  # streamed: stopped at the limit
    assert answer.provider == "an"
    before = chunks[: next(i for i, c in enumerate(chunks) if c.restart)]
    assert sum(len(c.text) for c in before) <= 50

    alone = make_gateway(setup(model_server, ["gpt"], task={"max_answer_chars": 50}))
    model_server.script(CHAT, Reply(content=long))
    with pytest.raises(errors.AnswerRejected, match="max_answer_chars = 50"):
        await alone.ask("reply", "Hello")


async def test_an_answer_refused_by_a_guardrail_goes_to_a_person_instead(
    app, model_server, make_gateway, wait_status
):
    model_server.script(CHAT, *[Reply(content='{"urgent": "maybe"}')] * 2)
    app.gateway = make_gateway(setup(model_server, ["gpt"]))

    @app.workflow("draft")
    async def draft(ctx: flowdesk.Context, text: str) -> dict[str, Any]:
        try:
            ticket = await ctx.model("reply", text, schema=Ticket)
            by = "model"
        except flowdesk.StepFailed as exc:  # never passed on: a person writes it
            ticket = await ctx.human_task(
                "write_ticket",
                title="Triage this ticket",
                form=Ticket,
                context={"text": text, "refused": exc.error_type},
                candidates=Assignees(users=("bob",)),
            )
            by = "person"
        return {"by": by, **ticket.model_dump()}

    async with app, app.worker():
        handle = await app.start("draft", {"text": "I was charged twice"})
        await wait_status(app, handle.id, RunStatus.WAITING)
        inbox = Inbox(app)
        task = await inbox.get(f"{handle.id}-t2")
        assert task.context == {"text": "I was charged twice", "refused": "AnswerRejected"}
        await inbox.complete(task.id, Person("bob"), GOOD)
        result = await app.result(handle.id, timeout=30)
    assert result == {"by": "person", **GOOD}
    assert len(model_server.seen(CHAT)) == 2  # the answer and its one retry, not replayed


async def test_the_time_limit_covers_the_whole_answer(model_server, make_gateway):
    model_server.script(CHAT, Reply(delay=30))
    gw = make_gateway(setup(model_server, ["gpt"], task={"answer_timeout_s": 0.2}))
    with pytest.raises(errors.AnswerTimeout, match="answer_timeout_s = 0.2"):
        await gw.ask("reply", "Hello")
    assert gw.stats()["failed"] == 1


async def test_only_the_named_provider_answers(model_server, make_gateway):
    gw = make_gateway(setup(model_server, ["gpt", "claude"]))
    answer = await gw.ask("reply", "Hello", provider="an")
    assert answer.provider == "an" and model_server.seen(CHAT) == []
    with pytest.raises(errors.ConfigurationError, match="No provider 'nope'"):
        await gw.ask("reply", "Hello", provider="nope")
