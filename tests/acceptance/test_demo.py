"""What `make run` starts (examples/orders.py), as a newcomer would use it: the API answers,
sample orders, approval requests, support messages and invoices flow through it, people's decisions
resume runs, the audit chain verifies, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import FLOWDESK, Procs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orders.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _poll(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_demo_serves_the_api_with_work_flowing_and_stops_cleanly(
    tmp_path: Path, procs: Procs
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
    env["FLOWDESK_PORT"] = str(port)
    demo = procs.spawn([sys.executable, str(EXAMPLE)], env=env, cwd=tmp_path, name="demo")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert demo.alive(), demo.describe()
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    _poll(healthy, "the API to answer")
    token_file = tmp_path / ".flowdesk-admin-token"
    token = _poll(lambda: token_file.exists() and token_file.read_text().strip(), "the token")
    assert token_file.stat().st_mode & 0o777 == 0o600
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(base + "/runs", timeout=5).status_code == 401

    # the web UI: / leads to it, and the demo approver signs in with the printed password
    with httpx.Client(base_url=base, timeout=10, follow_redirects=True) as browser:
        form = browser.get("/")
        assert form.status_code == 200 and form.url.path == "/ui/login"
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        inbox = browser.post(
            "/ui/login",
            data={"user": "dana", "password": "flowdesk-demo", "csrf": csrf.group(1)},
        )
        assert inbox.status_code == 200 and inbox.url.path == "/ui/inbox", inbox.text[:500]

    def approved_and_finished() -> bool:
        runs = httpx.get(base + "/runs", params={"limit": 200}, headers=auth, timeout=5).json()
        done = [r for r in runs["items"] if r["workflow"] == "orders.fulfil" and r["output"]]
        tasks = httpx.get(
            base + "/tasks", params={"status": "completed", "limit": 200}, headers=auth, timeout=5
        ).json()
        # dana decides the big orders' approvals (other people decide the assistants' tasks)
        return bool(done) and "dana" in {t["completed_by"] for t in tasks["items"]}

    _poll(approved_and_finished, "a finished order and an approval task dana completed", 180)

    def assistants_at_work() -> bool:
        runs = httpx.get(base + "/runs", params={"limit": 500}, headers=auth, timeout=5).json()
        kinds = {r["workflow"] for r in runs["items"] if r["status"] == "succeeded"}
        return {"approvals.request", "orders.fulfil"} <= kinds and any(
            r["workflow"] == "support.conversation" for r in runs["items"]
        )

    _poll(assistants_at_work, "decided approval requests and support conversations", 120)

    def mail_taken() -> bool:  # the two sample e-mails in ./support-mail/
        runs = httpx.get(
            base + "/runs", params={"workflow": "support.email"}, headers=auth, timeout=5
        ).json()["items"]
        return len(runs) == 2 and all(r["status"] == "succeeded" for r in runs)

    _poll(mail_taken, "the sample e-mails handed to the support assistant", 120)
    assert sorted(p.name for p in (tmp_path / "support-mail" / "done").iterdir()) == [
        "1-card.eml",
        "2-card-reply.eml",
    ]

    def invoices_at_work() -> bool:
        runs = httpx.get(
            base + "/runs", params={"limit": 100, "workflow": "invoices.process"}, headers=auth
        ).json()["items"]
        reviews = httpx.get(
            base + "/tasks", params={"kind": "invoices.review", "status": "open"}, headers=auth
        ).json()["items"]
        done = [r["output"]["outcome"] for r in runs if r["status"] == "succeeded"]
        return "approved" in done and bool(reviews)

    _poll(invoices_at_work, "sample invoices posted and some waiting for review", 180)
    with sqlite3.connect(tmp_path / "erp.db") as erp:
        (posted,) = erp.execute("SELECT COUNT(*) FROM ap_invoices").fetchone()
    assert posted >= 1

    os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C
    assert demo.popen.wait(timeout=30) == 0, demo.describe()
    assert "Traceback" not in demo.stderr(), demo.describe()
    assert "sign in as dana (the demo approver)" in demo.stdout()
    assert "omar (the demo operator), password 'flowdesk-demo'" in demo.stdout()

    verify = procs.run(
        [*FLOWDESK, "audit", "verify", "--database-url", f"sqlite:///{tmp_path / 'flowdesk.db'}"],
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain OK" in verify.stdout
