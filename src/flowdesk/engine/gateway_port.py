"""The engine's view of a model gateway: the port `Context.model` calls.

The engine sits below ``flowdesk.models`` and never imports it. `App.gateway` holds any
object with this shape; ``flowdesk.models.gateway.Gateway`` is the one flowdesk ships::

    from flowdesk.models.gateway import Gateway

    app.gateway = Gateway.from_toml("models.toml")

The gateway answers with a JSON-able dict (what the run's history records) and turns a
recorded dict back into its own answer type (``flowdesk.models.base.Answer``), so a first run
and a replay hand workflow code the same object. With ``ctx.model(..., schema=Model)`` the
engine passes ``schema`` on, and returns ``Model.model_validate(recorded["data"])``: a
gateway that takes ``schema`` records the validated answer as JSON under ``data``.
``on_chunk`` is passed on when the workflow streams; only the final answer is recorded.
"""

from __future__ import annotations

from typing import Any, Protocol


class ModelGateway(Protocol):
    """What `Context.model` needs of a model gateway."""

    async def answer(
        self,
        task: str,
        input: Any,
        hints: dict[str, Any],
        *,
        run_id: str,
        seq: int,
        workflow: str,
    ) -> dict[str, Any]:
        """Answer ``input`` for ``task`` and return the answer as a JSON-able dict.

        ``schema=`` and ``on_chunk=`` are passed as keywords only when the workflow uses
        them, so a gateway without structured output or streaming keeps working.

        Raises a `flowdesk.errors.FlowdeskError` (usually a `ModelError`) when no model in
        the task's chain gave an acceptable answer; the engine records it as the step's
        final error, with no further retries."""
        ...

    def load_answer(self, recorded: dict[str, Any]) -> Any:
        """The answer object workflow code receives, built from a recorded dict."""
        ...
