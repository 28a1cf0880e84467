"""``flowdesk privacy`` and ``flowdesk keys`` run as subprocesses on a real SQLite file
whose payloads are sealed: a subject-access export, an erasure (the run still shows, its
payloads erased, the audit verifying), a key rotation, and a missing master key."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
from typing import Any

import pytest

import flowdesk

from .conftest import FLOWDESK, Flow

APP = "privacyapp.py:app"
APP_SOURCE = """
from __future__ import annotations

import flowdesk

app = flowdesk.App()


@app.step
def lookup(email: str) -> dict:
    return {"email": email, "iban": "DE02120300000000202051"}


@app.workflow("kyc")
async def kyc(ctx: flowdesk.Context, email: str) -> dict:
    await ctx.add_subject("customer:42")
    found = await ctx.step(lookup, email)
    return {"iban": found["iban"]}
"""


def _ok(flow: Flow, *args: str) -> subprocess.CompletedProcess[str]:
    result = flow.cli(*args)
    assert result.returncode == 0, f"flowdesk {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _run_one(flow: Flow, monkeypatch: pytest.MonkeyPatch, email: str) -> str:
    """Start and finish one run in this process, with the processes' key file."""
    monkeypatch.setenv("FLOWDESK_MASTER_KEY_FILE", str(flow.key_file))
    monkeypatch.syspath_prepend(str(flow.root))
    import importlib

    module = importlib.import_module("privacyapp")
    app: flowdesk.App = module.app
    app.database_url = flow.url

    async def go() -> str:
        async with app, app.worker():
            handle = await app.start("kyc", {"email": email})
            await handle.result(timeout=20)
            return handle.id

    return asyncio.run(go())


def test_export_erase_rotate_and_a_missing_key(flow: Flow, monkeypatch: pytest.MonkeyPatch) -> None:
    (flow.root / "privacyapp.py").write_text(APP_SOURCE)
    email = f"ann.{secrets.token_hex(3)}@example.org"
    run_id = _run_one(flow, monkeypatch, email)
    wal = flow.root / "t.db-wal"  # checkpointed into the file when the app closed
    raw = flow.db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert email.encode() not in raw and b"$fd1$" in raw

    export: dict[str, Any] = flow.cli_json("privacy", "export", "customer:42")
    (run,) = export["runs"]
    assert run["id"] == run_id and run["input"] == {"email": email}
    assert run["steps"][0]["output"]["iban"] == "DE02120300000000202051"
    assert run["output"] == {"iban": "DE02120300000000202051"}

    # Rotation: a new master key, every data key re-wrapped, the payloads untouched.
    before = flow.rows("SELECT output FROM steps WHERE run_id = ?", (run_id,))
    old_id = flow.cli_json("keys", "status")["current"]
    rotated = flow.cli_json("keys", "rotate")
    assert rotated["key_id"] != old_id and rotated["rewrapped"] >= 1
    assert flow.rows("SELECT output FROM steps WHERE run_id = ?", (run_id,)) == before
    status = flow.cli_json("keys", "status")
    assert status["current"] == rotated["key_id"] and old_id not in status["data_keys"]
    _ok(flow, "keys", "retire", old_id)
    assert old_id not in flow.key_file.read_text()
    assert email in _ok(flow, "runs", "show", run_id).stdout

    # Another master key: a clear error naming the key that is needed, no garbage.
    stranger = base64.b64encode(secrets.token_bytes(32)).decode()
    env = {**flow.env, "FLOWDESK_MASTER_KEY": stranger}
    wrong = flow.procs.run((*FLOWDESK, "runs", "show", run_id), env=env, cwd=flow.root, timeout=30)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert rotated["key_id"] in wrong.stderr and email not in wrong.stdout

    # Erasure: the run still shows with its metadata; its payloads are gone.
    erased = flow.cli_json("privacy", "erase", "customer:42", "--yes", "--reason", "ticket 9")
    assert erased["runs"] == [run_id] and erased["cancelled"] == []
    shown = _ok(flow, "runs", "show", run_id).stdout
    assert "succeeded" in shown and "lookup" in shown and "[erased: data subject" in shown
    assert email not in shown
    after = flow.cli_json("privacy", "export", "customer:42")
    assert after["runs"][0]["erased"] and after["runs"][0]["status"] == "succeeded"
    _ok(flow, "audit", "verify")
    actions = [
        json.loads(r[0])
        for r in flow.rows("SELECT data FROM audit WHERE action = 'subject.erased'")
    ]
    assert actions == [
        {"reason": "ticket 9", "runs": [run_id], "cancelled": [], "keys": erased["keys"]}
    ]
