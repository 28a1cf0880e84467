"""An app that wires no model gateway: its workflow asks the task ``generate``, which
``flowdesk worker`` answers with the packaged local model (`Gateway.default`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

import flowdesk

app = flowdesk.App()


class Greeting(BaseModel):
    greeting: str
    friendly: bool


@app.workflow("greet")
async def greet(ctx: flowdesk.Context, name: str) -> dict[str, Any]:
    chunks: list[str] = []

    async def on_chunk(chunk: Any) -> None:
        chunks.append(chunk.text)

    answer = await ctx.model("generate", f"Say hello to {name}.", max_tokens=16, on_chunk=on_chunk)
    shaped = await ctx.model(
        "generate", f"Greet {name} in JSON.", schema=Greeting, max_tokens=40, temperature=0
    )
    return {
        "text": answer.text,
        "streamed": "".join(chunks),
        "provider": answer.provider,
        "model": answer.model,
        "tokens_out": answer.tokens_out,
        "shaped": shaped.model_dump(),
    }
