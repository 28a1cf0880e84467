"""Fixtures for the acceptance tests: real `flowdesk` processes on a real SQLite file.

Every subprocess is started in its own process group and tracked by `Procs`. A test ends
a process in one of two ways only: `Procs.kill` (SIGKILL to the group: the crash under
test) or `Procs.stop` (SIGTERM to the group, wait 5 s, SIGKILL what is left), which also
runs for every process still alive when the test ends, passed or failed. `Procs.pause`
and `Procs.resume` (SIGSTOP, SIGCONT) freeze a process the way a long GC pause or a
stalled VM does.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from . import crashapp, sealed

HERE = Path(__file__).resolve().parent
FLOWDESK = (sys.executable, "-m", "flowdesk")
STOP_GRACE_SECONDS = 5.0
APP = "crashapp:app"


class Proc:
    """A tracked subprocess whose output goes to files."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        name: str,
        out: Path,
        err: Path,
        handles: Sequence[IO[bytes]],
    ) -> None:
        self.popen = popen
        self.name = name
        self.out_path = out
        self.err_path = err
        self._handles = list(handles)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close_files(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    def stdout(self) -> str:
        return self.out_path.read_text("utf-8", errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text("utf-8", errors="replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def describe(self) -> str:
        tail = self.stderr()[-3000:]
        return f"{self.name} (pid {self.pid}, exit {self.popen.returncode}); stderr tail:\n{tail}"


class Procs:
    """Starts, kills and stops subprocesses; `stop_all` cleans up whatever is left."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []
        self._short: list[subprocess.Popen[str]] = []

    def spawn(self, args: Sequence[str], *, env: dict[str, str], cwd: Path, name: str) -> Proc:
        n = len(self.started)
        out_path = self.log_dir / f"{n:03d}-{name}.out"
        err_path = self.log_dir / f"{n:03d}-{name}.err"
        out = out_path.open("wb")
        err = err_path.open("wb")
        try:
            popen = subprocess.Popen(
                list(args),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        except BaseException:
            out.close()
            err.close()
            raise
        proc = Proc(popen, name, out_path, err_path, (out, err))
        self.started.append(proc)
        return proc

    def run(
        self, args: Sequence[str], *, env: dict[str, str], cwd: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command to completion, capturing its output."""
        popen = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._short.append(popen)
        try:
            out, err = popen.communicate(timeout=timeout)
        except BaseException:
            self._stop_group(popen)
            popen.communicate()
            raise
        finally:
            self._short.remove(popen)
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)

    def kill(self, proc: Proc) -> None:
        """The crash under test: SIGKILL to the whole process group, no warning."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait(timeout=10)
        proc.close_files()

    def pause(self, proc: Proc) -> None:
        os.killpg(proc.pid, signal.SIGSTOP)

    def resume(self, proc: Proc) -> None:
        os.killpg(proc.pid, signal.SIGCONT)

    def stop(self, proc: Proc) -> int:
        """Terminate the process group, wait 5 s, kill what is left."""
        self._stop_group(proc.popen)
        proc.close_files()
        return proc.popen.returncode

    @staticmethod
    def _stop_group(popen: subprocess.Popen[Any]) -> None:
        try:
            os.killpg(popen.pid, signal.SIGTERM)
            os.killpg(popen.pid, signal.SIGCONT)  # a paused process must see the SIGTERM
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait()

    def stop_all(self) -> None:
        for popen in list(self._short):
            self._stop_group(popen)
            popen.communicate()
        for proc in self.started:
            if proc.popen.returncode is None:
                self._stop_group(proc.popen)
            proc.close_files()


class Flow:
    """One test's world: a temporary folder (the processes' cwd), the flowdesk database,
    the side database the steps write to, and the processes working on them."""

    def __init__(self, root: Path, procs: Procs) -> None:
        self.root = root
        self.procs = procs
        self.db = root / "t.db"
        self.side_db = root / "side.db"
        self.url = f"sqlite:///{self.db}"
        self.key_file = root / "master.key"  # payloads are sealed at rest under its keys
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
        env.update(
            FLOWDESK_DATABASE_URL=self.url,
            FLOWDESK_MASTER_KEY_FILE=str(self.key_file),
            FLOWDESK_TEST_SIDE_DB=str(self.side_db),
            FLOWDESK_LOG_LEVEL="INFO",
            PYTHONPATH=os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
            ),
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        crashapp.init_side_db(str(self.side_db))

    # -- processes -------------------------------------------------------------------
    def spawn(self, *args: str, name: str) -> Proc:
        """``flowdesk ARGS`` in the background, output to files."""
        return self.procs.spawn((*FLOWDESK, *args), env=self.env, cwd=self.root, name=name)

    def spawn_starter(
        self,
        workflow: str,
        count: int,
        payload: Any,
        *,
        key_prefix: str | None = None,
        name: str = "starter",
    ) -> Proc:
        """``python -m crashapp start``: starts runs one by one through the Python API."""
        args = [
            sys.executable,
            "-m",
            "crashapp",
            "start",
            workflow,
            "--count",
            str(count),
            "--input",
            json.dumps(payload),
        ]
        if key_prefix:
            args += ["--key-prefix", key_prefix]
        return self.procs.spawn(args, env=self.env, cwd=self.root, name=name)

    def worker(
        self,
        *,
        lease: float = 1.5,
        poll: float = 0.1,
        concurrency: int | None = None,
        name: str = "worker",
        ready: bool = True,
    ) -> Proc:
        args = ["worker", "--app", APP, "--lease-seconds", str(lease), "--poll-interval", str(poll)]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        proc = self.spawn(*args, name=name)
        if ready:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = 20.0) -> None:
        """A worker is ready once its first heartbeat row is in the database."""
        self.wait_until(
            lambda: bool(self.rows("SELECT 1 FROM workers WHERE pid = ?", (proc.pid,))),
            timeout=timeout,
            what=f"worker {proc.name} to register",
            watch=[proc],
        )

    def kill(self, proc: Proc) -> None:
        self.procs.kill(proc)

    def stop(self, proc: Proc) -> int:
        return self.procs.stop(proc)

    def pause(self, proc: Proc) -> None:
        self.procs.pause(proc)

    def resume(self, proc: Proc) -> None:
        self.procs.resume(proc)

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``flowdesk ARGS`` to completion."""
        return self.procs.run((*FLOWDESK, *args), env=self.env, cwd=self.root, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 30.0) -> Any:
        result = self.cli(*args, "--json", timeout=timeout)
        assert result.returncode == 0, (
            f"flowdesk {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
        return json.loads(result.stdout)

    def init_db(self) -> None:
        """Create the schema (opening an App migrates), then read it through the CLI."""
        import asyncio

        import flowdesk

        async def create() -> None:
            app = flowdesk.App(self.url)
            await app.open()
            await app.close()

        asyncio.run(create())
        assert self.cli_json("runs", "list") == {"runs": [], "next_cursor": None}

    def start(self, workflow: str, payload: Any, *extra: str) -> str:
        out = self.cli_json("start", workflow, "--app", APP, "--input", json.dumps(payload), *extra)
        assert out["created"] is True, out
        return str(out["id"])

    # -- databases -------------------------------------------------------------------
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read the flowdesk database (never creates it)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=rw", uri=True, timeout=10)
        try:
            return list(conn.execute(sql, tuple(params)).fetchall())
        finally:
            conn.close()

    def payload(self, run_id: str, seq: int, kind: str, stored: str | None) -> Any:
        """A payload read raw with `rows` (sealed at rest), opened: ``kind`` is
        ``input``, ``output``, ``error``, ``step.output``, ``step.error``..."""
        return sealed.opener(self.url, self.rows, self.key_file)(run_id, seq, kind, stored)

    def side(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = crashapp.connect_side(str(self.side_db))
        try:
            return list(conn.execute(sql, tuple(params)).fetchall())
        finally:
            conn.close()

    def status_counts(self) -> dict[str, int]:
        return dict(self.rows("SELECT status, COUNT(*) FROM runs GROUP BY status"))

    # -- waiting ---------------------------------------------------------------------
    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        watch: Sequence[Proc] = (),
        interval: float = 0.02,
    ) -> None:
        """Poll ``predicate`` until it is true; fail early when a watched process died."""
        poll_until(predicate, timeout=timeout, what=what, watch=watch, interval=interval)


def poll_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    watch: Sequence[Proc] = (),
    interval: float = 0.02,
    transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError,),
) -> None:
    """Poll ``predicate`` until it is true. A ``transient`` error (no file or no schema
    yet) counts as false; a watched process that died fails the test at once."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if predicate():
                return
            last_error = None
        except transient as exc:
            last_error = exc
        for proc in watch:
            if not proc.alive():
                pytest.fail(f"while waiting for {what}: {proc.describe()}")
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    tracker = Procs(tmp_path / "logs")
    try:
        yield tracker
    finally:
        tracker.stop_all()


@pytest.fixture
def flow(tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> Flow:
    root = tmp_path / "work"
    root.mkdir()
    made = Flow(root, procs)
    # Apps the test opens in its own process use the processes' master key file too.
    monkeypatch.setenv("FLOWDESK_MASTER_KEY_FILE", str(made.key_file))
    return made
