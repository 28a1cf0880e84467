"""The `flowdesk` command line, run as a subprocess against a real worker process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from . import crashapp
from .conftest import APP, Flow, Proc

FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture
def worker(flow: Flow) -> Iterator[Proc]:
    proc = flow.worker(lease=1.5, poll=0.05, name="cli-worker")
    yield proc
    flow.stop(proc)


def _show(flow: Flow, run_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = flow.cli_json("runs", "show", run_id)
    return shown


def _wait_status(flow: Flow, run_id: str, *statuses: str, timeout: float = 20) -> None:
    flow.wait_until(
        lambda: flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0] in statuses,
        timeout=timeout,
        what=f"run {run_id} to be {' or '.join(statuses)}",
    )


def _assert_clean_error(result: Any, *needles: str) -> None:
    assert result.returncode != 0, result
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


# -- start -------------------------------------------------------------------------------
def test_start_wait_json_prints_the_output(flow: Flow, worker: Proc) -> None:
    result = flow.cli(
        "start",
        "greet",
        "--app",
        APP,
        "--input",
        '{"name": "Ada", "times": 2}',
        "--wait",
        "--timeout",
        "30",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["created"] is True
    assert out["workflow"] == "greet"
    assert out["status"] == "succeeded"
    assert out["error"] is None
    assert out["output"] == {"greeting": "hello Ada hello Ada", "key": f"{out['id']}:1"}


def test_start_without_json_prints_the_id(flow: Flow, worker: Proc) -> None:
    result = flow.cli("start", "greet", "--app", APP, "--input", '{"name": "Bo"}')
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    _wait_status(flow, run_id, *FINISHED)
    assert _show(flow, run_id)["status"] == "succeeded"


def test_start_wait_of_a_failing_run_exits_non_zero(flow: Flow, worker: Proc) -> None:
    crashapp.set_flag(str(flow.side_db), "door", "fail")
    result = flow.cli(
        "start",
        "flaky",
        "--app",
        APP,
        "--input",
        '{"flag": "door"}',
        "--wait",
        "--timeout",
        "30",
        "--json",
    )
    assert result.returncode == 1, result
    out = json.loads(result.stdout)
    assert out["status"] == "failed"
    assert out["output"] is None
    assert out["error"]["type"] == "StepFailed"
    assert "flag 'door' says fail" in out["error"]["message"]


def test_idempotency_key_twice_gives_the_same_run(flow: Flow) -> None:
    flow.init_db()
    args = (
        "start",
        "greet",
        "--app",
        APP,
        "--input",
        '{"name": "Cy"}',
        "--idempotency-key",
        "order-17",
    )
    first = flow.cli_json(*args)
    second = flow.cli_json(*args)
    assert first["created"] is True
    assert second["created"] is False
    assert second["id"] == first["id"]
    plain = flow.cli(*args)
    assert plain.returncode == 0
    assert plain.stdout.strip() == f"{first['id']} (existing run)"
    assert len(flow.cli_json("runs", "list")["runs"]) == 1

    other = flow.cli(
        "start", "greet", "--app", APP, "--input", '{"name": "Di"}', "--idempotency-key", "order-17"
    )
    _assert_clean_error(other, "order-17", first["id"])


def test_start_wait_gives_up_after_its_timeout(flow: Flow) -> None:
    flow.init_db()  # no worker: the run stays queued
    result = flow.cli(
        "start", "greet", "--app", APP, "--input", '{"name": "Gus"}', "--wait", "--timeout", "1"
    )
    _assert_clean_error(result, "still queued after 1.0 s")
    assert flow.rows("SELECT status FROM runs") == [("queued",)]


# -- runs list / show --------------------------------------------------------------------
def test_runs_list_filters_by_status_and_workflow(flow: Flow, worker: Proc) -> None:
    done = [
        flow.cli_json(
            "start",
            "greet",
            "--app",
            APP,
            "--input",
            json.dumps({"name": n}),
            "--wait",
            "--timeout",
            "30",
        )["id"]
        for n in ("a", "b")
    ]
    waiting = flow.start("approval", {"item": "desk"})
    _wait_status(flow, waiting, "waiting")

    listed = flow.cli_json("runs", "list")
    assert listed["next_cursor"] is None
    assert [r["id"] for r in listed["runs"]] == [waiting, *reversed(done)]  # newest first
    by_id = {r["id"]: r for r in listed["runs"]}
    assert by_id[waiting]["status"] == "waiting"
    assert by_id[waiting]["waiting_for"] == ["approve"]
    assert by_id[done[0]]["input"] == {"name": "a", "times": 1}

    def ids(*args: str) -> set[str]:
        return {r["id"] for r in flow.cli_json("runs", "list", *args)["runs"]}

    assert ids("--status", "succeeded") == set(done)
    assert ids("--status", "waiting") == {waiting}
    assert ids("--status", "failed") == set()
    assert ids("--workflow", "greet") == set(done)
    assert ids("--workflow", "approval") == {waiting}
    assert ids("--workflow", "greet", "--status", "waiting") == set()

    page = flow.cli_json("runs", "list", "--limit", "2")
    assert len(page["runs"]) == 2 and page["next_cursor"]
    rest = flow.cli_json("runs", "list", "--limit", "2", "--cursor", page["next_cursor"])
    assert [r["id"] for r in page["runs"] + rest["runs"]] == [r["id"] for r in listed["runs"]]
    assert rest["next_cursor"] is None

    _assert_clean_error(flow.cli("runs", "list", "--status", "sleeping"), "sleeping")
    _assert_clean_error(flow.cli("runs", "list", "--cursor", "not-a-cursor"), "cursor")

    table = flow.cli("runs", "list")
    assert table.returncode == 0
    assert waiting in table.stdout and "approval" in table.stdout


def test_runs_show_json_has_status_input_output_error_and_steps(flow: Flow, worker: Proc) -> None:
    ok = flow.cli_json(
        "start", "greet", "--app", APP, "--input", '{"name": "Eve"}', "--wait", "--timeout", "30"
    )["id"]
    shown = _show(flow, ok)
    assert shown["id"] == ok
    assert shown["workflow"] == "greet"
    assert shown["status"] == "succeeded"
    assert shown["input"] == {"name": "Eve", "times": 1}
    assert shown["output"] == {"greeting": "hello Eve", "key": f"{ok}:1"}
    assert shown["error"] is None
    assert shown["finished_at"] is not None
    assert [(s["seq"], s["name"], s["kind"], s["status"], s["output"]) for s in shown["steps"]] == [
        (1, "work", "step", "ok", f"{ok}:1")
    ]

    crashapp.set_flag(str(flow.side_db), "gate", "fail")
    bad = flow.cli_json("start", "flaky", "--app", APP, "--input", '{"flag": "gate"}')["id"]
    _wait_status(flow, bad, *FINISHED)
    shown = _show(flow, bad)
    assert shown["status"] == "failed"
    assert shown["output"] is None
    assert shown["error"]["type"] == "StepFailed"
    assert [(s["seq"], s["name"], s["status"]) for s in shown["steps"]] == [
        (1, "work", "ok"),
        (2, "gatekeeper", "error"),
    ]
    assert shown["steps"][1]["error"]["type"] == "Permanent"

    text = flow.cli("runs", "show", bad)
    assert text.returncode == 0
    assert "failed" in text.stdout and "gatekeeper" in text.stdout


# -- signal / cancel / retry -------------------------------------------------------------
def test_signal_resumes_a_waiting_run(flow: Flow, worker: Proc) -> None:
    run_id = flow.start("approval", {"item": "chair"})
    _wait_status(flow, run_id, "waiting")
    shown = _show(flow, run_id)
    assert shown["waiting_for"] == ["approve"]
    assert [(s["seq"], s["kind"], s["status"]) for s in shown["steps"]] == [
        (1, "signal", "pending")
    ]

    sent = flow.cli("signal", run_id, "approve", "--payload", '{"by": "Fay", "ok": true}')
    assert sent.returncode == 0, sent.stderr
    assert run_id in sent.stdout
    _wait_status(flow, run_id, *FINISHED)
    shown = _show(flow, run_id)
    assert shown["status"] == "succeeded", shown
    assert shown["output"] == {
        "item": "chair",
        "decision": {"by": "Fay", "ok": True},
        "key": f"{run_id}:2",
    }
    _assert_clean_error(flow.cli("signal", run_id, "approve"), run_id, "succeeded")


def test_a_signal_sent_before_the_run_waits_is_kept(flow: Flow) -> None:
    flow.init_db()
    run_id = flow.start("approval", {"item": "early"})  # queued: no worker yet
    sent = flow.cli("signal", run_id, "approve", "--payload", '"yes"')
    assert sent.returncode == 0, sent.stderr
    worker = flow.worker(lease=1.5, poll=0.05, name="late-worker")
    _wait_status(flow, run_id, *FINISHED)
    shown = _show(flow, run_id)
    assert shown["status"] == "succeeded", shown
    assert shown["output"]["decision"] == "yes"
    assert flow.stop(worker) == 0, worker.describe()


def test_cancel_a_waiting_run(flow: Flow, worker: Proc) -> None:
    run_id = flow.start("approval", {"item": "lamp"})
    _wait_status(flow, run_id, "waiting")
    result = flow.cli("cancel", run_id, "--reason", "not needed")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{run_id}: cancelled"
    shown = _show(flow, run_id)
    assert shown["status"] == "cancelled"
    assert shown["error"]["message"] == "not needed"
    assert flow.side("SELECT COUNT(*) FROM executions WHERE run_id = ?", (run_id,)) == [(0,)]


def test_cancel_a_running_run(flow: Flow, worker: Proc) -> None:
    gate = flow.root / "never"
    run_id = flow.start("holder", {"gate_path": str(gate)})
    flow.wait_until(
        lambda: flow.side("SELECT COUNT(*) FROM executions WHERE run_id = ?", (run_id,)) == [(1,)],
        timeout=20,
        what="the hold step to start",
        watch=[worker],
    )
    result = flow.cli("cancel", run_id)
    assert result.returncode == 0, result.stderr
    assert "cancellation requested" in result.stdout
    _wait_status(flow, run_id, *FINISHED)
    shown = _show(flow, run_id)
    assert shown["status"] == "cancelled"
    assert shown["error"]["message"] == "cancelled by request"
    assert flow.side("SELECT seq FROM executions WHERE run_id = ?", (run_id,)) == [(1,)]
    assert flow.side("SELECT COUNT(*) FROM effects WHERE run_id = ?", (run_id,)) == [(0,)]
    _assert_clean_error(flow.cli("retry", run_id), run_id, "cancelled")


def test_retry_resumes_a_failed_run_from_the_failed_step(flow: Flow, worker: Proc) -> None:
    crashapp.set_flag(str(flow.side_db), "switch", "fail")
    run_id = flow.start("flaky", {"flag": "switch"})
    _wait_status(flow, run_id, *FINISHED)
    assert _show(flow, run_id)["status"] == "failed"
    _assert_clean_error(flow.cli("retry", "0" * 32), "0" * 32)

    crashapp.set_flag(str(flow.side_db), "switch", "pass")
    result = flow.cli("retry", run_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{run_id}: queued again"
    _wait_status(flow, run_id, *FINISHED)
    shown = _show(flow, run_id)
    assert shown["status"] == "succeeded", shown
    assert shown["error"] is None
    assert shown["output"] == [f"{run_id}:{i}" for i in (1, 2, 3)]
    executions = flow.side(
        "SELECT seq, COUNT(*) FROM executions WHERE run_id = ? GROUP BY seq", (run_id,)
    )
    assert executions == [(1, 1), (2, 2), (3, 1)]  # the recorded step 1 was not run again
    assert flow.side("SELECT COUNT(*) FROM effects WHERE run_id = ?", (run_id,)) == [(3,)]
    _assert_clean_error(flow.cli("retry", run_id), run_id, "succeeded")


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("start", "nope", "--app", APP), ("Unknown workflow 'nope'", "greet")),
        (("start", "greet", "--app", APP, "--input", "{name: 1"), ("--input", "not valid JSON")),
        (
            ("start", "greet", "--app", APP, "--input", '{"times": "many"}'),
            ("Invalid input for workflow 'greet'", "name", "times"),
        ),
        (("start", "greet", "--app", APP, "--input", "[1, 2]"), ("must be a JSON object",)),
        (("start", "greet", "--app", "no_such_module:app"), ("no_such_module",)),
        (("start", "greet"), ("--app",)),
        (("runs", "show", "f" * 32), ("No run with id",)),
        (("signal", "f" * 32, "approve"), ("No run with id",)),
        (("signal", "f" * 32, "approve", "--payload", "{oops"), ("--payload",)),
        (("cancel", "f" * 32), ("No run with id",)),
        (("retry", "f" * 32), ("No run with id",)),
    ],
    ids=[
        "unknown-workflow",
        "invalid-json",
        "invalid-input",
        "input-not-object",
        "unknown-app-module",
        "no-app",
        "show-unknown-run",
        "signal-unknown-run",
        "signal-invalid-payload",
        "cancel-unknown-run",
        "retry-unknown-run",
    ],
)
def test_errors_are_one_clear_line(
    flow: Flow, args: tuple[str, ...], needles: tuple[str, ...]
) -> None:
    flow.init_db()
    result = flow.cli(*args)
    _assert_clean_error(result, *needles)
    assert result.returncode == 1
    assert flow.rows("SELECT COUNT(*) FROM runs") == [(0,)]


def test_a_file_that_is_not_a_database_is_refused(flow: Flow) -> None:
    junk = flow.root / "junk.db"
    junk.write_bytes(b"\x00\xffnot a database at all\x13\x37" * 200)
    before = junk.read_bytes()
    url = f"sqlite:///{junk}"
    for args in (
        ("runs", "list"),
        ("runs", "show", "f" * 32),
        ("start", "greet", "--app", APP, "--input", '{"name": "x"}'),
    ):
        result = flow.cli(*args, "--database-url", url)
        _assert_clean_error(result, f"{str(junk)!r} is not a flowdesk database")
    assert junk.read_bytes() == before  # left untouched


def test_another_programs_sqlite_database_is_refused(flow: Flow) -> None:
    theirs = flow.root / "theirs.db"
    conn = sqlite3.connect(theirs)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()
    result = flow.cli("runs", "list", "--database-url", f"sqlite:///{theirs}")
    _assert_clean_error(result, "did not create", "invoices")
    conn = sqlite3.connect(theirs)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    finally:
        conn.close()
    assert tables == ["invoices"]


def test_read_commands_never_create_a_database(flow: Flow) -> None:
    missing = flow.root / "typo.db"
    url = f"sqlite:///{missing}"
    for args in (
        ("runs", "list"),
        ("runs", "show", "f" * 32),
        ("signal", "f" * 32, "approve"),
        ("cancel", "f" * 32),
        ("retry", "f" * 32),
    ):
        result = flow.cli(*args, "--database-url", url)
        _assert_clean_error(result, "no flowdesk database at", str(missing))
        assert result.returncode == 1
    assert not missing.exists()
