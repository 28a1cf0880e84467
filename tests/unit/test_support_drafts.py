"""Drafted replies of the support assistant from a language-model route (a real
OpenAI-wire HTTP service under uvicorn), on both stores: a follow-up's draft sees the
conversation so far, and a message handed to a person for low model confidence comes with
a draft for that person to check."""

# The fixtures imported from test_assistant_support are parameters of these tests.
# ruff: noqa: F811

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpserver import serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_assistant_support import _open, build, desk, models_toml, ticket_service  # noqa: F401

from flowdesk import RunStatus
from flowdesk.humans.inbox import Inbox
from flowdesk.store.people import Person

PROMPTS: list[str] = []


async def _chat(request: Request) -> Response:
    """Answers ``stream: true`` as server-sent events, word by word, as such servers do."""
    body = await request.json()
    PROMPTS.append(str(body["messages"][-1]["content"]))
    content = f"Drafted reply {len(PROMPTS)}: we are on it."
    if not body.get("stream"):
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        return JSONResponse({"id": "c", "model": body["model"], "choices": [choice]})
    first, *rest = content.split(" ")
    events: list[dict[str, Any]] = [
        {"model": body["model"], "choices": [{"index": 0, "delta": {"content": piece}}]}
        for piece in [first, *(" " + word for word in rest)]
    ]
    events.append({"model": body["model"], "choices": [], "usage": USAGE})
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return Response(sse, media_type="text/event-stream")


USAGE = {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    api = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    with serving(api, "drafting-llm") as url:
        yield url + "/v1"


def drafting(models_toml: Path, llm_url: str, folder: Path, threshold: float = 0.25) -> Path:
    config = folder / "drafting.toml"
    config.write_text(
        models_toml.read_text().replace(
            "confidence_threshold = 0.25", f"confidence_threshold = {threshold}"
        )
        + f'\n[providers.llm]\ntype = "openai"\nbase_url = "{llm_url}"\nretries = 0\n\n'
        '[models.writer]\nprovider = "llm"\nmodel = "writer-1"\ncapabilities = ["generate"]\n\n'
        '[tasks.support_reply]\ncapability = "generate"\nchain = ["writer"]\n'
    )
    return config


async def test_a_follow_ups_draft_sees_the_conversation_so_far(
    app, models_toml, desk, llm_url, tmp_path, wait_status
) -> None:
    PROMPTS.clear()
    ticket_desk, _ = desk
    support = build(
        app, drafting(models_toml, llm_url, tmp_path), ticket_desk, draft_task="support_reply"
    )
    try:
        async with app, app.worker():
            first = "I ordered a card two weeks ago and it still has not arrived."
            run_id, _ = await support.receive("d-1", "c-1", first, message_id="1")
            await support.receive(
                "d-1", "c-1", "And what exchange rate do you use abroad?", message_id="2"
            )
            done = await wait_status(app, run_id, RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()
    one, two = done.output["messages"]
    assert one["reply"]["answer"] == "Drafted reply 1: we are on it." and one["reply"]["drafted"]
    assert two["reply"]["answer"] == "Drafted reply 2: we are on it."
    assert "Earlier in this conversation" not in PROMPTS[0]
    earlier = PROMPTS[1].split("Earlier in this conversation:\n")[1]
    assert earlier.startswith(f"Customer: {first}\nAnswer: Drafted reply 1: we are on it.\n")
    assert (
        PROMPTS[1].rstrip().endswith("Customer: And what exchange rate do you use abroad?\nAnswer:")
    )


async def test_a_low_confidence_message_reaches_a_person_with_a_draft_to_check(
    app, models_toml, desk, llm_url, tmp_path, wait_until, wait_status
) -> None:
    PROMPTS.clear()
    ticket_desk, _ = desk
    support = build(
        app,
        drafting(models_toml, llm_url, tmp_path, threshold=1.0),  # every answer is unsure
        ticket_desk,
        agents=["sam"],
        agent_groups=[],
        draft_task="support_reply",
    )
    inbox = Inbox(app)
    try:
        async with app, app.worker():
            run_id, _ = await support.receive(
                "d-2", "c-2", "I ordered a card two weeks ago and it still has not arrived"
            )
            (task,) = (await wait_until(lambda: _open(inbox), what="review task")).items
            suggestion: dict[str, Any] = task.context["suggestion"]
            assert task.context["why"] == "low model confidence"
            assert suggestion["drafted"] and suggestion["answer"].startswith("Drafted reply 1")
            assert suggestion["citations"][0] == "card-delivery"  # the articles beside it
            await inbox.complete(
                task.id, Person(id="sam"), {"action": "answer", "reply": suggestion["answer"]}
            )
            run = await wait_status(app, run_id, RunStatus.SUCCEEDED)
    finally:
        await app.gateway.close()
    (m,) = run.output["messages"]
    assert m["outcome"] == "escalated" and m["review"]["reply"].startswith("Drafted reply 1")
