"""The flow-control commands of the `flowdesk` command line, against a real worker
process: `fork --from-step`, `start --queue/--priority/--dedupe-key/--run-timeout`, and the
errors of `fork` and `schedules pause|resume`."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from typing import Any

import pytest

from . import flowapp
from .conftest import Flow, Proc

APP = flowapp.APP


def _start(flow: Flow, workflow: str, payload: Any, *extra: str) -> dict[str, Any]:
    out: dict[str, Any] = flow.cli_json(
        "start", workflow, "--app", APP, "--input", json.dumps(payload), *extra
    )
    return out


def _show(flow: Flow, run_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = flow.cli_json("runs", "show", run_id)
    return shown


def _status(flow: Flow, run_id: str) -> str:
    return str(flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0])


def _wait_status(
    flow: Flow, run_id: str, status: str, watch: list[Proc], timeout: float = 20
) -> None:
    flow.wait_until(
        lambda: _status(flow, run_id) == status,
        timeout=timeout,
        what=f"run {run_id} to be {status}",
        watch=watch,
    )


def _assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _stages(flow: Flow, run_id: str) -> list[int]:
    return [
        int(seq)
        for (seq,) in flow.side("SELECT seq FROM stages WHERE run_id = ? ORDER BY seq", (run_id,))
    ]


@pytest.mark.timeout(90)
def test_flow_control_commands(flow: Flow) -> None:
    flowapp.init_side_db(str(flow.side_db))

    # -- before any worker: priorities and dedupe keys, on queued runs --------------------
    by_priority = {
        p: _start(flow, "ordered", {"label": f"p{p}"}, "--priority", str(p))["id"]
        for p in (0, 10, 5)
    }
    for p, run_id in by_priority.items():
        shown = _show(flow, run_id)
        assert (shown["priority"], shown["queue"], shown["status"]) == (p, "serial", "queued")

    first = _start(flow, "ocr_page", {"page": 1}, "--queue", "parked", "--dedupe-key", "doc-1")
    assert first["created"] is True
    again = _start(flow, "ocr_page", {"page": 2}, "--queue", "parked", "--dedupe-key", "doc-1")
    assert again == {**first, "created": False}, "a queued run with the key exists"
    plain = flow.cli(
        "start", "ocr_page", "--app", APP, "--input", '{"page": 3}', "--dedupe-key", "doc-1"
    )
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == f"{first['id']} (existing run)"
    other = _start(flow, "ocr_page", {"page": 4}, "--queue", "parked", "--dedupe-key", "doc-2")
    assert other["created"] is True and other["id"] != first["id"]
    shown = _show(flow, first["id"])
    assert (shown["queue"], shown["status"], shown["input"]) == ("parked", "queued", {"page": 1})

    # -- a worker (it serves the workflows' queues, not "parked") -------------------------
    worker = flowapp.spawn_worker(flow, name="cli-worker", lease=5.0)
    for run_id in by_priority.values():
        _wait_status(flow, run_id, "succeeded", [worker])
    order = [
        label
        for (label,) in flow.side(
            "SELECT label FROM spans WHERE workflow = 'ordered' ORDER BY started"
        )
    ]
    assert order == ["p10", "p5", "p0"], order
    time.sleep(0.5)
    assert _status(flow, first["id"]) == "queued", "nobody serves queue 'parked'"
    assert _start(flow, "ocr_page", {"page": 5}, "--dedupe-key", "doc-1") == {
        **first,
        "created": False,
    }
    # Once the run is no longer queued, the key starts a new run.
    cancelled = flow.cli("cancel", first["id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert _status(flow, first["id"]) == "cancelled"
    fresh = _start(flow, "ocr_page", {"page": 6}, "--dedupe-key", "doc-1")
    assert fresh["created"] is True and fresh["id"] != first["id"]
    _wait_status(flow, fresh["id"], "succeeded", [worker])

    # -- fork --from-step -----------------------------------------------------------------
    done = flow.cli_json(
        "start",
        "pipeline",
        "--app",
        APP,
        "--input",
        '{"label": "doc"}',
        "--wait",
        "--timeout",
        "30",
    )
    original = str(done["id"])
    assert done["status"] == "succeeded", done
    assert done["output"] == ["doc", "stage-1", "stage-2", "stage-3"]
    assert _stages(flow, original) == [1, 2, 3]

    forked = flow.cli_json("fork", original, "--from-step", "2")
    fork_id = str(forked["id"])
    assert forked == {"id": fork_id, "forked_from": original, "forked_seq": 2}
    assert fork_id != original
    _wait_status(flow, fork_id, "succeeded", [worker])
    shown = _show(flow, fork_id)
    assert shown["forked_from"] == original and shown["forked_seq"] == 2
    assert shown["workflow"] == "pipeline" and shown["input"] == {"label": "doc", "stages": 3}
    assert shown["output"] == done["output"], "the kept result of step 1 fed step 2"
    assert [(s["seq"], s["status"]) for s in shown["steps"]] == [(1, "ok"), (2, "ok"), (3, "ok")]
    assert _stages(flow, fork_id) == [2, 3], "the fork executed a step before --from-step"
    assert _stages(flow, original) == [1, 2, 3], "forking ran the original's steps again"
    text = flow.cli("runs", "show", fork_id)
    assert text.returncode == 0, text.stderr
    assert f"forked    from {original} at step 2" in text.stdout, text.stdout
    listed = flow.cli("fork", original, "--from-step", "3")
    assert listed.returncode == 0, listed.stderr
    assert f"(forked from {original} at step 3)" in listed.stdout, listed.stdout
    plain_fork = listed.stdout.split()[0]
    _wait_status(flow, plain_fork, "succeeded", [worker])
    assert _stages(flow, plain_fork) == [3]

    # -- --run-timeout cancels a waiting run ------------------------------------------------
    timed = _start(flow, "approval", {"item": "invoice"}, "--run-timeout", "3")["id"]
    _wait_status(flow, timed, "waiting", [worker], timeout=2.5)
    untimed = _start(flow, "approval", {"item": "receipt"})["id"]
    _wait_status(flow, untimed, "waiting", [worker])
    _wait_status(flow, timed, "cancelled", [worker], timeout=10)
    shown = _show(flow, timed)
    assert shown["error"]["type"] == "WorkflowTimeout", shown["error"]
    assert [(s["kind"], s["status"]) for s in shown["steps"]] == [("signal", "pending")], shown
    took_ms = round((_ts(shown["finished_at"]) - _ts(shown["created_at"])) * 1000)
    assert 3000 <= took_ms < 7000, f"cancelled {took_ms} ms after it was created"
    assert _status(flow, untimed) == "waiting", "a run without --run-timeout was cancelled"
    text = flow.cli("runs", "show", timed)
    assert "error     WorkflowTimeout: " in text.stdout, text.stdout

    # -- errors: a clear message and a non-zero exit ---------------------------------------
    _assert_clean_error(flow.cli("fork", "no-such-run", "--from-step", "1"), "no-such-run")
    _assert_clean_error(flow.cli("fork", original, "--from-step", "0"), "numbered from 1")
    _assert_clean_error(
        flow.cli("schedules", "pause", "no-such-schedule", "--app", APP), "no-such-schedule"
    )
    _assert_clean_error(
        flow.cli("schedules", "resume", "no-such-schedule", "--app", APP), "no-such-schedule"
    )
    # None of them left a run behind.
    forks = flow.rows("SELECT COUNT(*) FROM runs WHERE forked_from IS NOT NULL")
    assert forks == [(2,)]

    assert flow.stop(worker) == 0, worker.describe()
    assert "Traceback" not in worker.output(), worker.output()[-3000:]
