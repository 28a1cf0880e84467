"""`flowdesk worker` on an app that wires no gateway answers ``ctx.model("generate")``
with the packaged local model, in the worker process, streamed and structured."""

from __future__ import annotations

import json

from .conftest import Flow

APP = "llmapp:app"


def test_the_embedded_setup_has_a_generative_route_with_no_configuration(flow: Flow) -> None:
    flow.init_db()
    worker = flow.spawn("worker", "--app", APP, "--poll-interval", "0.1", name="worker")
    flow.wait_ready(worker)
    out = flow.cli_json("start", "greet", "--app", APP, "--input", json.dumps({"name": "Ada"}))
    run_id = out["id"]
    flow.wait_until(
        lambda: (
            flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0]
            in ("succeeded", "failed")
        ),
        timeout=90,
        what="the run to finish",
        watch=[worker],
    )
    shown = flow.cli_json("runs", "show", run_id)
    assert shown["status"] == "succeeded", shown
    result = shown["output"]
    assert (result["provider"], result["model"]) == ("llm", "smollm2-135m-instruct")
    assert result["text"] and result["streamed"] == result["text"]
    assert 0 < result["tokens_out"] <= 16
    assert set(result["shaped"]) == {"greeting", "friendly"}
    assert isinstance(result["shaped"]["friendly"], bool)
    assert flow.stop(worker) == 0, worker.describe()
    assert "Traceback" not in worker.output(), worker.output()[-3000:]
