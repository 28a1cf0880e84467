"""DBOS Transact side of the scale-out benchmark (`benchmarks/scale.py`).

Run with the interpreter of the ``dbos`` virtual environment (`_peers.dbos_python`);
flowdesk is not importable here. Two modes:

``worker``: one DBOS process on a PostgreSQL system database. It registers the workload
(a workflow of five no-op async steps) and the queue ``scale``, prints ``READY`` on
stdout once launched, and dequeues and runs workflows until SIGTERM. Every worker
process gets its own ``executor_id``, so none ever recovers another's workflows.

``produce``: enqueues ``--runs`` workflows on the queue with `DBOSClient` (the
documented way to enqueue from outside the application), as fast as it can, then prints
one JSON object (the wall-clock time of the first and of the last enqueue, and the CPU
time the enqueueing took) and exits.
The benchmark watches the system database itself to see when all have finished.

How several DBOS processes share a queue (DBOS 3.4, ``dbos/_queue.py`` and
``dbos/_sys_db.py``): each process has one thread per queue that wakes every
``polling_interval_sec`` (default 1.0 s, with +-5% jitter) and claims ENQUEUED rows of
the queue in one transaction (``SELECT ... FOR UPDATE SKIP LOCKED`` when the queue has no
global limit, then ``UPDATE ... SET status = 'PENDING'``). There is no wake-up on
enqueue: a process only looks at the queue when its polling interval has passed.
Without ``worker_concurrency`` a poll claims *every* enqueued row (no LIMIT), so the
first process to poll takes the whole backlog and the others idle; with
``worker_concurrency = C`` a poll claims at most C minus what the process already runs.
The benchmark therefore sets ``worker_concurrency`` (the same C as flowdesk's
``--concurrency``) and a short polling interval, and prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib.metadata
import json
import logging
import signal
import sys
import threading
import time

from dbos import DBOS, DBOSClient, DBOSConfig, EnqueueOptions

QUEUE = "scale"
WORKFLOW = "scale_five"
STEPS = 5


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


@DBOS.step(name="scale_noop")
async def noop_step() -> None:
    return None


@DBOS.workflow(name=WORKFLOW)
async def five_steps() -> None:
    for _ in range(STEPS):
        await noop_step()


def worker(args: argparse.Namespace) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    config: DBOSConfig = {
        "name": args.app_name,
        "system_database_url": args.url,
        "executor_id": args.executor_id,
        "log_level": "WARNING",
    }
    if args.pool_size:
        config["sys_db_pool_size"] = args.pool_size
    DBOS(config=config)
    DBOS.launch()
    queue = DBOS.register_queue(
        QUEUE,
        worker_concurrency=args.worker_concurrency or None,
        polling_interval_sec=args.polling_interval,
        on_conflict="always_update",
    )
    settings = {
        "queue": queue.name,
        "worker_concurrency": queue._worker_concurrency,
        "global_concurrency": queue._concurrency,
        "polling_interval_sec": queue._polling_interval_sec,
        "executor_id": DBOS.executor_id,
        "application_version": DBOS.application_version,
    }
    sys.stdout.write("READY " + json.dumps(settings) + "\n")
    sys.stdout.flush()
    stop.wait()
    DBOS.destroy(workflow_completion_timeout_sec=5)


async def _produce(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    # enqueue_async runs the synchronous insert in asyncio's default executor: give it as
    # many threads as the client has connections.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(args.pool_size))
    client = DBOSClient(
        system_database_url=args.url,
        application_name=args.app_name,
        system_database_pool_size=args.pool_size,
    )
    options: EnqueueOptions = {"workflow_name": WORKFLOW, "queue_name": QUEUE}
    try:
        await client.check_connection_async()  # connect before the clock starts
        cpu0 = time.process_time()
        t_first = time.time()
        done = 0
        while done < args.runs:
            n = min(args.chunk, args.runs - done)
            await asyncio.gather(*(client.enqueue_async(options) for _ in range(n)))
            done += n
        t_last = time.time()
        cpu = time.process_time() - cpu0
    finally:
        client.destroy()
    return {"t_first": t_first, "t_last": t_last, "cpu_s": cpu}


def produce(args: argparse.Namespace) -> None:
    result = asyncio.run(_produce(args))
    result["version"] = importlib.metadata.version("dbos")  # type: ignore[assignment]
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--url", required=True)
    w.add_argument("--app-name", default="flowdesk-scale-dbos")
    w.add_argument("--executor-id", required=True)
    w.add_argument("--worker-concurrency", type=int, default=50)
    w.add_argument("--polling-interval", type=float, default=0.05)
    w.add_argument("--pool-size", type=int, default=0, help="0: DBOS's default (20)")
    pr = sub.add_parser("produce")
    pr.add_argument("--url", required=True)
    pr.add_argument("--app-name", default="flowdesk-scale-dbos")
    pr.add_argument("--runs", type=int, required=True)
    pr.add_argument("--chunk", type=int, default=500)
    pr.add_argument("--pool-size", type=int, default=10)
    args = p.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    if args.mode == "worker":
        worker(args)
    else:
        produce(args)


if __name__ == "__main__":
    main()
