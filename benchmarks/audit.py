"""Audit chain benchmark: append cost and verification speed on SQLite (and PostgreSQL).

    python benchmarks/audit.py [--records 100000] [--per-tx 1000]
                               [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

For each store it builds a chain of ``--records`` records through the store's own append
path (``App.submit`` of transactions that each call ``tx.audit(...)`` ``--per-tx`` times;
``SqlTx.seal_audit`` chains and inserts them at commit), signs a checkpoint, then times
``AuditLog.verify()`` over the whole chain. It prints:

* append, batched: seconds and microseconds per record for the whole build;
* append, one record per transaction: what one audit record adds to a small write
  transaction (a new worker row, written with and without one record, ``--single`` of
  each; the median of each);
* hashing alone: ``audit.chain`` over the same number of events in memory (no database);
* verify: records, seconds, records/s (and that the chain verified).

SQLite runs on a file in a temporary directory. With ``--postgres URL`` (a server where the
role may create databases) the same runs on a temporary database created there and dropped
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import flowdesk
from flowdesk.governance.audit import AuditLog
from flowdesk.store import audit as records


def _event_data(i: int) -> dict[str, Any]:
    # About the size of a step.recorded record: a few names and two digests.
    return {
        "seq": i % 50 + 1,
        "name": f"charge_card_{i % 7}",
        "kind": "step",
        "status": "ok",
        "output_sha256": records.digest(f"output {i}"),
        "error_sha256": None,
    }


async def build_chain(app: flowdesk.App, count: int, per_tx: int) -> float:
    """Append ``count`` records, ``per_tx`` to a transaction; returns seconds."""
    t0 = time.perf_counter()
    for first in range(0, count, per_tx):
        last = min(first + per_tx, count)

        async def op(tx: Any, first: int = first, last: int = last) -> None:
            for i in range(first, last):
                tx.audit("step.recorded", f"run:bench{i // 50:08d}", _event_data(i))

        await app.submit(op)
    return time.perf_counter() - t0


async def single_record_cost(app: flowdesk.App, n: int) -> tuple[float, float]:
    """Median seconds of a small write transaction (a new worker row), without, then with,
    one audit record."""
    info = {"host": "bench", "pid": 1, "queues": ["default"], "concurrency": 1}
    counter = iter(range(10**9))

    async def plain(tx: Any) -> None:
        await tx.heartbeat(f"bench-{next(counter)}", [], 30_000, info)

    async def audited(tx: Any) -> None:
        await tx.heartbeat(f"bench-{next(counter)}", [], 30_000, info)
        tx.audit("bench.single", "worker:bench", {"n": 1})

    medians = []
    for op in (plain, audited):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await app.submit(op)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return medians[0], medians[1]


def hashing_only(count: int) -> float:
    events = [
        records.AuditEvent("system", "step.recorded", f"run:bench{i // 50:08d}", _event_data(i))
        for i in range(count)
    ]
    t0 = time.perf_counter()
    records.chain(events, 0, records.GENESIS, 0)
    return time.perf_counter() - t0


async def bench_store(label: str, url: str, key_file: Path, args: argparse.Namespace) -> bool:
    app = flowdesk.App(url)
    async with app:
        build_s = await build_chain(app, args.records, args.per_tx)
        plain_s, audited_s = await single_record_cost(app, args.single)
        log = AuditLog(app, key_file)
        checkpoint = await log.checkpoint()
        t0 = time.perf_counter()
        report = await log.verify()
        verify_s = time.perf_counter() - t0
    hash_s = hashing_only(args.records)
    total = report.records
    print(f"\n== {label} ==")
    print(
        f"append, batched     {args.records:>9,} records in {build_s:7.2f} s  "
        f"{build_s / args.records * 1e6:8.1f} µs/record  "
        f"{args.records / build_s:>10,.0f} records/s  ({args.per_tx} per transaction)"
    )
    print(
        f"append, 1 per tx    small write tx {plain_s * 1e3:.3f} ms, with one audit record "
        f"{audited_s * 1e3:.3f} ms: +{(audited_s - plain_s) * 1e6:.1f} µs per record "
        f"(median of {args.single} each)"
    )
    print(
        f"hashing alone       {args.records:>9,} records in {hash_s:7.2f} s  "
        f"{hash_s / args.records * 1e6:8.1f} µs/record  (audit.chain, in memory)"
    )
    print(
        f"verify              {total:>9,} records in {verify_s:7.2f} s  "
        f"{verify_s / total * 1e6:8.1f} µs/record  {total / verify_s:>10,.0f} records/s  "
        f"-> {'OK' if report.ok else 'PROBLEMS: ' + str(report.problems[:3])}"
        f" (checkpoint at {checkpoint.seq if checkpoint else '-'} checked)"
    )
    return report.ok and total == args.records + args.single


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


async def bench_postgres(server: str, tmp: Path, args: argparse.Namespace) -> bool:
    import psycopg
    from psycopg import sql

    name = f"flowdesk_bench_audit_{secrets.token_hex(6)}"
    admin = server if urlsplit(server).path not in ("", "/") else _with_db(server, "postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        return await bench_store(
            f"PostgreSQL ({urlsplit(server).hostname}, temporary database {name})",
            _with_db(server, name),
            tmp / "pg-audit.key",
            args,
        )
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def main(args: argparse.Namespace) -> int:
    ok = True
    with tempfile.TemporaryDirectory(prefix="flowdesk-audit-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.no_sqlite:
            db = tmp / "audit.db"
            ok &= await bench_store(f"SQLite ({db})", f"sqlite:///{db}", tmp / "audit.key", args)
        if args.postgres:
            ok &= await bench_postgres(args.postgres, tmp, args)
    if not ok:
        print("\nverification FAILED on an untouched chain", file=sys.stderr)
        return 1
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000, help="records in the chain")
    p.add_argument("--per-tx", type=int, default=1000, help="records per transaction")
    p.add_argument("--single", type=int, default=1000, help="transactions for the one-record cost")
    p.add_argument("--postgres", metavar="URL", help="also run on this PostgreSQL server")
    p.add_argument("--no-sqlite", action="store_true", help="skip SQLite (with --postgres)")
    args = p.parse_args()
    if args.records < 1 or args.per_tx < 1 or args.single < 1:
        p.error("--records, --per-tx and --single must be >= 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
