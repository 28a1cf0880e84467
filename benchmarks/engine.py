"""Engine benchmark: durable no-op steps and 3-step workflows on SQLite, beside DBOS.

    python benchmarks/engine.py [--steps 2000] [--workflows 500] [--concurrency 20]
                                [--durability full,normal] [--encryption on,off]
                                [--no-peers]

For each durability (SQLite WAL with synchronous=FULL: a commit survives power loss;
synchronous=NORMAL: it survives a killed process) it prints:

* the floor: what one bare SQLite commit of one small row costs on this disk;
* step overhead p50/p99: one workflow awaiting N no-op steps, each timed inside the
  workflow, and the ratio of the p50 to one commit;
* steps/s sequential (that loop) and concurrent (``--concurrency`` workflows at once);
* workflows/s: ``--workflows`` 3-step workflows started at once, all awaited;
* workflow latency p50/p99: 200 3-step workflows one after another (start + result).

With ``--encryption on,off`` (the default) the flowdesk workload runs twice: with payload
encryption at rest (the default: every step result sealed with AES-256-GCM) and with it
switched off (``FLOWDESK_PAYLOAD_ENCRYPTION=off``), and the difference in step overhead is
printed.

The same workload runs on DBOS Transact (its own virtual environment under ``.bench/``,
its SQLite system database switched to the same WAL + synchronous setting), in the same
run, and the ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowdesk

LATENCY_WORKFLOWS = 200


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5) * 1000, "p99": pct(values, 0.99) * 1000}


def commit_floor(conn: sqlite3.Connection, n: int = 2000) -> float:
    """Seconds per bare commit of one small row (median), on the connection and database
    file the engine just used, so both pay the same fsync in the same WAL state."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_floor (k TEXT, seq INTEGER, v TEXT,"
        " PRIMARY KEY (k, seq)) WITHOUT ROWID"
    )
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO bench_floor VALUES (?, ?, ?)", ("r" * 32, i, "null"))
        conn.execute("COMMIT")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_app(url: str) -> flowdesk.App:
    app = flowdesk.App(url)

    @app.step
    async def noop() -> None:
        return None

    @app.workflow("bench.timed")
    async def timed(ctx: flowdesk.Context, n: int) -> dict[str, Any]:
        durations = []
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            await ctx.step(noop)
            durations.append(time.perf_counter() - t0)
        return {"durations": durations, "total": time.perf_counter() - start}

    @app.workflow("bench.steps")
    async def steps(ctx: flowdesk.Context, n: int) -> None:
        for _ in range(n):
            await ctx.step(noop)

    @app.workflow("bench.three")
    async def three(ctx: flowdesk.Context) -> None:
        for _ in range(3):
            await ctx.step(noop)

    return app


async def run_flowdesk(
    db: Path, synchronous: str, n_steps: int, n_workflows: int, concurrency: int
) -> dict[str, Any]:
    app = build_app(f"sqlite:///{db}?synchronous={synchronous}")
    async with app, app.worker(concurrency=max(concurrency, n_workflows)):
        # warm up, past the WAL's first checkpoint so the file is in its steady state
        await app.result((await app.start("bench.timed", {"n": max(n_steps, 2000)})).id)
        await asyncio.gather(*[app.result((await app.start("bench.three")).id) for _ in range(20)])

        timed = await app.result((await app.start("bench.timed", {"n": n_steps})).id)
        conn = app.store.conn  # type: ignore[attr-defined]
        floor = commit_floor(conn)
        timed_again = await app.result((await app.start("bench.timed", {"n": n_steps})).id)
        floor = (floor + commit_floor(conn)) / 2
        timed["durations"] += timed_again["durations"]
        timed["total"] += timed_again["total"]
        per = n_steps // concurrency
        t0 = time.perf_counter()
        handles = await asyncio.gather(
            *[app.start("bench.steps", {"n": per}) for _ in range(concurrency)]
        )
        for h in handles:
            await app.result(h.id)
        concurrent = per * concurrency / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        handles = await asyncio.gather(*[app.start("bench.three") for _ in range(n_workflows)])
        for h in handles:
            await app.result(h.id)
        workflows = n_workflows / (time.perf_counter() - t0)

        latencies = []
        for _ in range(LATENCY_WORKFLOWS):
            t0 = time.perf_counter()
            await app.result((await app.start("bench.three")).id)
            latencies.append(time.perf_counter() - t0)
    return {
        "engine": "flowdesk",
        "version": flowdesk.__version__,
        "step_overhead_ms": ms(timed["durations"]),
        "sequential_steps_per_s": 2 * n_steps / timed["total"],
        "commit_floor_ms": floor * 1000,
        "concurrent_steps_per_s": concurrent,
        "workflows_per_s": workflows,
        "workflow_latency_ms": ms(latencies),
    }


def show(label: str, r: dict[str, Any], floor_ms: float | None = None) -> None:
    so, wl = r["step_overhead_ms"], r["workflow_latency_ms"]
    extra = f"  ({so['p50'] / floor_ms:.2f}x one commit)" if floor_ms else ""
    print(f"  {label:9} step p50 {so['p50']:7.3f} ms  p99 {so['p99']:7.3f} ms{extra}")
    print(
        f"  {'':9} steps/s sequential {r['sequential_steps_per_s']:9.0f}   "
        f"concurrent {r['concurrent_steps_per_s']:9.0f}"
    )
    print(
        f"  {'':9} 3-step workflows/s {r['workflows_per_s']:9.0f}   "
        f"latency p50 {wl['p50']:.3f} ms  p99 {wl['p99']:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workflows", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--durability", default="full,normal")
    parser.add_argument("--encryption", default="on,off", help="payload encryption: on, off")
    parser.add_argument("--no-peers", action="store_true", help="skip DBOS")
    parser.add_argument("--json", type=Path, help="also write all figures to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = Path(tmp)
        for sync in args.durability.split(","):
            by_mode: dict[str, dict[str, Any]] = {}
            for mode in args.encryption.split(","):
                os.environ["FLOWDESK_PAYLOAD_ENCRYPTION"] = mode
                by_mode[mode] = asyncio.run(
                    run_flowdesk(
                        folder / f"flowdesk-{sync}-{mode}.db",
                        sync,
                        args.steps,
                        args.workflows,
                        args.concurrency,
                    )
                )
            os.environ.pop("FLOWDESK_PAYLOAD_ENCRYPTION", None)
            ours = by_mode.get("on") or next(iter(by_mode.values()))
            floor_ms = ours["commit_floor_ms"]
            print(
                f"SQLite WAL, synchronous={sync.upper()}: floor = one bare commit of one row "
                f"{floor_ms:.3f} ms (same file, between the step loops)"
            )
            entry: dict[str, Any] = {"commit_ms": floor_ms, "flowdesk": ours}
            for mode, r in by_mode.items():
                show("flowdesk" if mode == "on" else "plain", r, r["commit_floor_ms"])
                entry["flowdesk_encryption_" + mode] = r
            if "on" in by_mode and "off" in by_mode:
                on, off = by_mode["on"], by_mode["off"]
                extra = {
                    q: on["step_overhead_ms"][q] / off["step_overhead_ms"][q] - 1
                    for q in ("p50", "p99")
                }
                steps_s = 1 - on["sequential_steps_per_s"] / off["sequential_steps_per_s"]
                print(
                    f"  encryption at rest adds {extra['p50']:+.1%} to the step p50, "
                    f"{extra['p99']:+.1%} to the p99, costs {steps_s:+.1%} sequential steps/s"
                )
                entry["encryption_overhead"] = {**extra, "sequential_steps": steps_s}
            if not args.no_peers:
                import _peers

                peer = _peers.run_dbos(
                    folder / f"dbos-{sync}.db", sync, args.steps, args.workflows, args.concurrency
                )
                show(f"DBOS {peer['version']}", peer)
                ratios = {
                    "step_p50": peer["step_overhead_ms"]["p50"] / ours["step_overhead_ms"]["p50"],
                    "sequential_steps": ours["sequential_steps_per_s"]
                    / peer["sequential_steps_per_s"],
                    "concurrent_steps": ours["concurrent_steps_per_s"]
                    / peer["concurrent_steps_per_s"],
                    "workflows": ours["workflows_per_s"] / peer["workflows_per_s"],
                    "workflow_latency_p50": peer["workflow_latency_ms"]["p50"]
                    / ours["workflow_latency_ms"]["p50"],
                }
                print("  flowdesk / DBOS: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
                entry.update(dbos=peer, ratios=ratios)
            results[sync] = entry
            print()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
