"""A worker is SIGKILLed right after step k of a 6-step run is recorded; a new worker
replays the run: recorded steps are not executed again, and every effect happens once."""

from __future__ import annotations

import json

import pytest

from .conftest import Flow

STEPS = 6
LEASE = 1.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("k", "gate_after_effect"),
    [(1, False), (3, False), (5, False), (2, True), (5, True)],
    ids=["k1", "k3", "k5", "k2-effect-written", "k5-effect-written"],
)
def test_sigkill_after_step_k_replays_from_k_plus_1(
    flow: Flow, k: int, gate_after_effect: bool
) -> None:
    gate = flow.root / "gate"
    run_id = flow.start(
        "chain",
        {
            "steps": STEPS,
            "delay_ms": 30,
            "gate_seq": k + 1,
            "gate_path": str(gate),
            "gate_after_effect": gate_after_effect,
        },
    )
    first = flow.worker(lease=LEASE, poll=0.1, name="worker-1")

    # Step k is recorded and step k+1 has started (it waits at the gate, which stays shut
    # until after the kill: the kill lands between the record of k and that of k+1).
    def at_kill_point() -> bool:
        recorded = flow.rows("SELECT status FROM steps WHERE run_id = ? AND seq = ?", (run_id, k))
        started = flow.side(
            "SELECT COUNT(*) FROM executions WHERE run_id = ? AND seq = ?", (run_id, k + 1)
        )[0][0]
        effect = flow.side(
            "SELECT COUNT(*) FROM effects WHERE run_id = ? AND seq = ?", (run_id, k + 1)
        )[0][0]
        return recorded == [("ok",)] and started == 1 and (effect == 1) == gate_after_effect

    flow.wait_until(
        at_kill_point, timeout=20, what=f"step {k} recorded, {k + 1} started", watch=[first]
    )
    flow.kill(first)
    assert first.popen.returncode == -9

    recorded = flow.rows("SELECT seq, status FROM steps WHERE run_id = ? ORDER BY seq", (run_id,))
    assert recorded == [(i, "ok") for i in range(1, k + 1)], recorded
    assert flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,)) == [("running",)]

    gate.touch()
    second = flow.worker(lease=LEASE, poll=0.1, name="worker-2")
    flow.wait_until(
        lambda: (
            flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0]
            in ("succeeded", "failed", "cancelled")
        ),
        timeout=20,
        what="the run to finish on the second worker",
        watch=[second],
    )

    shown = flow.cli_json("runs", "show", run_id)
    assert shown["status"] == "succeeded", json.dumps(shown, indent=1)[:3000]
    keys = [f"{run_id}:{i}" for i in range(1, STEPS + 1)]
    assert shown["output"] == keys
    assert [(s["seq"], s["name"], s["status"], s["attempts"]) for s in shown["steps"]] == [
        (i, "work", "ok", 1) for i in range(1, STEPS + 1)
    ]
    assert shown["attempts"] == 2  # claimed by the first worker, then by the second

    executions = dict(
        flow.side("SELECT seq, COUNT(*) FROM executions WHERE run_id = ? GROUP BY seq", (run_id,))
    )
    pids = dict(
        flow.side(
            "SELECT seq, GROUP_CONCAT(DISTINCT pid) FROM executions WHERE run_id = ? GROUP BY seq",
            (run_id,),
        )
    )
    for seq in range(1, k + 1):
        assert executions[seq] == 1, f"recorded step {seq} ran again: {executions}"
        assert pids[seq] == str(first.pid)
    assert executions[k + 1] >= 2, f"step {k + 1} was interrupted, so it runs again"
    for seq in range(k + 2, STEPS + 1):
        assert executions[seq] >= 1, executions
        assert str(first.pid) not in pids[seq].split(","), pids

    effects = flow.side("SELECT key, seq FROM effects WHERE run_id = ? ORDER BY seq", (run_id,))
    assert effects == [(key, i) for i, key in enumerate(keys, start=1)]
    writes = flow.side(
        "SELECT inserted, pid FROM effect_writes WHERE key = ? ORDER BY id", (keys[k],)
    )
    if gate_after_effect:
        # The killed attempt wrote the effect; the replayed one found its key and did not.
        assert writes == [(1, first.pid), (0, second.pid)], writes
    else:
        assert writes == [(1, second.pid)], writes
    assert flow.side("SELECT detail FROM anomalies") == []

    assert flow.stop(second) == 0, second.describe()
    assert "Traceback" not in second.output(), second.describe()


@pytest.mark.timeout(60)
def test_cancel_of_a_run_whose_worker_was_killed(flow: Flow) -> None:
    """The cancellation is stored while nobody executes the run; the worker that claims
    it after the lease ends it as cancelled without running its steps again."""
    gate = flow.root / "gate"
    run_id = flow.start(
        "chain", {"steps": 3, "delay_ms": 30, "gate_seq": 2, "gate_path": str(gate)}
    )
    first = flow.worker(lease=LEASE, poll=0.1, name="worker-1")
    flow.wait_until(
        lambda: (
            flow.side("SELECT COUNT(*) FROM executions WHERE run_id = ? AND seq = 2", (run_id,))
            == [(1,)]
        ),
        timeout=20,
        what="step 2 to start",
        watch=[first],
    )
    flow.kill(first)
    gate.touch()

    result = flow.cli("cancel", run_id, "--reason", "owner gone")
    assert result.returncode == 0, result.stderr
    assert "cancellation requested" in result.stdout
    second = flow.worker(lease=LEASE, poll=0.1, name="worker-2")
    flow.wait_until(
        lambda: flow.rows("SELECT status FROM runs WHERE id = ?", (run_id,))[0][0] != "running",
        timeout=20,
        what="the run to end",
        watch=[second],
    )
    shown = flow.cli_json("runs", "show", run_id)
    assert shown["status"] == "cancelled"
    assert shown["error"]["message"] == "owner gone"
    assert [(s["seq"], s["status"]) for s in shown["steps"]] == [(1, "ok")]
    assert flow.side("SELECT seq, pid FROM executions WHERE run_id = ? ORDER BY id", (run_id,)) == [
        (1, first.pid),
        (2, first.pid),
    ]
    assert flow.stop(second) == 0, second.describe()
