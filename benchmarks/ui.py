"""Web UI benchmark: how long the pages take to answer on a database with some history.

    python benchmarks/ui.py [--runs 3000] [--tasks 300] [--requests 30]

Builds a SQLite database in a temporary folder: ``--runs`` finished 3-step runs (so the
dashboard and the runs list have history to read) and ``--tasks`` invoice runs waiting
for review (an inbox of that many tasks, each with a real sample invoice in the document
archive). Then, in process through the ASGI transport (no network), it signs in once and
times ``--requests`` requests of each page, printing p50 and p95 in milliseconds: the
inbox, a review task page, a page preview (the first render, then from memory), the runs
list, a run page, the dashboard's panels and the audit list. Sign-in itself is timed too:
it is slow on purpose (argon2).

Figures depend on the machine and its load; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

import ui_invoice  # noqa: E402  (the tests' invoice workflow, same task shape)

import flowdesk  # noqa: E402
from flowdesk.documents import archive as archive_mod  # noqa: E402
from flowdesk.governance import audit as audit_log  # noqa: E402
from flowdesk.server import app as server  # noqa: E402
from flowdesk.store import people  # noqa: E402


def register_filler(app: flowdesk.App) -> None:
    @app.step(name="bench.a")
    async def a(n: int) -> int:
        return n + 1

    @app.workflow("bench.three")
    async def three(ctx: flowdesk.Context, n: int) -> int:
        for _ in range(3):
            n = await ctx.step(a, n)
        return n


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[max(0, int(len(ordered) * 0.95 + 0.5) - 1)]
    return statistics.median(ordered), p95


async def timed(client: httpx.AsyncClient, url: str, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        r = await client.get(url)
        samples.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
    return stats(samples)


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="flowdesk-ui-bench-"))
    app = flowdesk.App(f"sqlite:///{folder / 'ui.db'}", poll_interval=0.05)
    archive = archive_mod.Archive(folder / "documents")
    ui_invoice.register(app, archive)
    register_filler(app)
    async with app:
        await ui_invoice.create_users(app)
        started = time.perf_counter()
        async with app.worker(concurrency=50):
            filler = [await app.start("bench.three", {"n": i}) for i in range(args.runs)]
            for h in filler:
                await app.wait(h.id, timeout=600)
            for _ in range(args.tasks):
                await app.start("ui_test.invoice", {"path": str(ui_invoice.SAMPLE)})
            while True:
                page = await app.store.list_tasks(people.TaskQuery(limit=500))
                if len(page.items) >= args.tasks:
                    break
                await asyncio.sleep(0.2)
        print(
            f"database: {args.runs} finished runs, {args.tasks} open review tasks "
            f"(built in {time.perf_counter() - started:.1f} s)"
        )
        api = server.create_app(
            app, audit=audit_log.AuditLog(app, folder / "audit.key"), documents=archive
        )
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="https://bench") as client:
            form = await client.get("/ui/login")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert token
            t0 = time.perf_counter()
            r = await client.post(
                "/ui/login",
                data={"user": "olga", "password": ui_invoice.PASSWORD, "csrf": token.group(1)},
            )
            assert r.status_code == 303, r.text
            print(f"{'sign-in (argon2 verify)':32} {(time.perf_counter() - t0) * 1000:8.1f} ms")
            task = page.items[0]
            run_id = filler[-1].id
            rows: list[tuple[str, Any]] = []
            first = time.perf_counter()
            r = await client.get(f"/ui/tasks/{task.id}/pages/1.png")
            assert r.status_code == 200
            rows.append(("page preview, first render", (time.perf_counter() - first) * 1000))
            for label, url in (
                (f"inbox ({min(args.tasks, 200)} tasks shown)", "/ui/inbox"),
                ("review task page", f"/ui/tasks/{task.id}"),
                ("page preview, from memory", f"/ui/tasks/{task.id}/pages/1.png"),
                ("runs list (50)", "/ui/runs"),
                ("run page", f"/ui/runs/{run_id}"),
                ("dashboard panels (1 h)", "/ui/dashboard/panels?window=1h"),
                ("audit list (50)", "/ui/audit"),
            ):
                rows.append((label, await timed(client, url, args.requests)))
        print(f"{'page':32} {'p50 ms':>8} {'p95 ms':>8}   ({args.requests} requests each)")
        for label, value in rows:
            if isinstance(value, tuple):
                print(f"{label:32} {value[0]:8.1f} {value[1]:8.1f}")
            else:
                print(f"{label:32} {value:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--requests", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
