"""File drop (`flowdesk.triggers.filedrop`), in process on both stores: one run per file,
done/ and failed/, references instead of bytes, and a second watcher (a restart) that
finds files where the first left them. The kill tests with real processes are in
tests/acceptance/test_triggers_kill.py."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.triggers import filedrop


def register(app: flowdesk.App) -> None:
    @app.step(name="count_lines")
    def count_lines(path: str) -> int:
        with open(path, "rb") as f:
            return sum(1 for _ in f)

    @app.workflow("ingest")
    async def ingest(ctx: flowdesk.Context, file: filedrop.DroppedFile) -> dict[str, Any]:
        if file.name.startswith("bad"):
            raise flowdesk.Permanent("refused by the workflow")
        lines = await ctx.step(count_lines, file.path)
        return {"name": file.name, "lines": lines}

    @app.workflow("named")
    async def named(ctx: flowdesk.Context, path: str, name: str, sha256: str, size: int) -> str:
        return name

    @app.workflow("strict")
    async def strict(ctx: flowdesk.Context, path: str, customer: str) -> str:
        return customer


def drop(folder: Path, name: str, content: bytes, *, age: float = 5.0) -> Path:
    """Write a file as a finished drop (its mtime ``age`` seconds ago)."""
    path = folder / name
    path.write_bytes(content)
    mtime = path.stat().st_mtime - age
    os.utime(path, (mtime, mtime))
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def scan_until(watcher: filedrop.FileDrop, done: Any, *, wait_until: Any) -> None:
    async def finished() -> bool:
        await watcher.scan()
        return bool(done())

    await wait_until(finished, timeout=30, interval=0.05, what="the watcher's files to settle")


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


async def test_each_file_starts_one_run_and_moves_to_done(app, inbox, wait_until):
    register(app)
    contents = {f"batch-{i}.csv": b"a,b\n" * (i + 1) for i in range(3)}
    for name, content in contents.items():
        drop(inbox, name, content)
    async with app, app.worker(concurrency=5):
        watcher = filedrop.FileDrop(app, inbox, workflow="ingest", interval=0.05, settle=0.5)
        await scan_until(watcher, lambda: len(names(inbox / "done")) == 3, wait_until=wait_until)
        runs = (await app.list_runs(workflow="ingest")).items
        assert len(runs) == 3
        assert watcher.stats.started == 3 and watcher.stats.done == 3
        for run in runs:
            assert run.status is RunStatus.SUCCEEDED
            name = run.output["name"]
            sha = hashlib.sha256(contents[name]).hexdigest()
            assert run.idempotency_key == f"filedrop:ingest:{sha}"
            # The input is a reference to the file, never its bytes.
            assert run.input == {
                "path": str(inbox.resolve() / "processing" / sha / name),
                "name": name,
                "sha256": sha,
                "size": len(contents[name]),
            }
            assert run.output["lines"] == contents[name].count(b"\n")
        assert names(inbox / "done") == sorted(contents)
        for name, content in contents.items():
            assert (inbox / "done" / name).read_bytes() == content
        assert names(inbox) == ["done", "failed", "processing"]
        assert names(inbox / "processing") == [] and names(inbox / "failed") == []
        # Scanning again starts nothing.
        await watcher.scan()
        assert len((await app.list_runs()).items) == 3


async def test_a_failed_run_sends_its_file_to_failed_with_the_reason(app, inbox, wait_until):
    register(app)
    drop(inbox, "bad.csv", b"x\n")
    async with app, app.worker():
        watcher = filedrop.FileDrop(app, inbox, workflow="ingest", interval=0.05, settle=0)
        await scan_until(
            watcher, lambda: (inbox / "failed" / "bad.csv").exists(), wait_until=wait_until
        )
        reason = json.loads((inbox / "failed" / "bad.csv.reason.json").read_text())
        run = (await app.list_runs()).items[0]
        assert run.status is RunStatus.FAILED
        assert reason["run_id"] == run.id and reason["file"] == "bad.csv"
        assert "refused by the workflow" in reason["reason"]
        assert watcher.stats.failed == 1 and names(inbox / "done") == []


async def test_files_that_cannot_be_taken_go_to_failed_without_a_run(app, inbox, wait_until):
    register(app)
    drop(inbox, "huge.bin", b"0" * 2000)
    drop(inbox, "order.json", b"{}")
    async with app:
        big = filedrop.FileDrop(
            app, inbox, workflow="ingest", pattern="*.bin", settle=0, max_bytes=1000
        )
        await big.scan()
        assert names(inbox / "failed") == ["huge.bin", "huge.bin.reason.json"]
        note = json.loads((inbox / "failed" / "huge.bin.reason.json").read_text())
        assert "max_bytes=1000" in note["reason"] and note["run_id"] is None
        # The reference does not fit the workflow's input model: refused before any run.
        strict = filedrop.FileDrop(app, inbox, workflow="strict", settle=0)
        await strict.scan()
        assert "order.json" in names(inbox / "failed")
        note = json.loads((inbox / "failed" / "order.json.reason.json").read_text())
        assert "customer" in note["reason"] and "input was refused" in note["reason"]
        assert (await app.list_runs()).items == []
        assert names(inbox / "processing") == []


async def test_a_second_watcher_maps_each_file_to_the_run_already_started(
    app, make_app, inbox, wait_until
):
    """A watcher that stops between starting runs and moving files (its process ended), and
    a file left in processing/ before its run was started: the next watcher starts each
    file's run once."""
    register(app)
    drop(inbox, "first.csv", b"1\n")
    async with app:
        before = filedrop.FileDrop(app, inbox, workflow="ingest", settle=0)
        await before.scan()  # no worker: the run stays queued, the file in processing/
        assert before.stats.started == 1
        sha = hashlib.sha256(b"1\n").hexdigest()
        assert names(inbox / "processing" / sha) == ["first.csv"]
    # A crash right after the move into processing/, before the start:
    orphan_sha = hashlib.sha256(b"2\n").hexdigest()
    (inbox / "processing" / orphan_sha).mkdir()
    (inbox / "processing" / orphan_sha / "second.csv").write_bytes(b"2\n")
    (inbox / "processing" / ("0" * 64)).mkdir()  # an empty slot left by a crash

    later = make_app()
    register(later)
    async with later, later.worker():
        after = filedrop.FileDrop(later, inbox, workflow="ingest", interval=0.05, settle=0)
        await scan_until(after, lambda: len(names(inbox / "done")) == 2, wait_until=wait_until)
        assert after.stats.resumed == 1 and after.stats.started == 1
        runs = (await later.list_runs()).items
        assert len(runs) == 2 and {r.status for r in runs} == {RunStatus.SUCCEEDED}
        assert names(inbox / "processing") == []


async def test_same_content_under_another_name_starts_no_second_run(app, inbox, wait_until):
    register(app)
    drop(inbox, "a.txt", b"same\n")
    async with app, app.worker():
        watcher = filedrop.FileDrop(app, inbox, workflow="named", interval=0.05, settle=0)
        await scan_until(watcher, lambda: names(inbox / "done") == ["a.txt"], wait_until=wait_until)
        drop(inbox, "copy-of-a.txt", b"same\n")
        drop(inbox, "a.txt", b"same\n")  # dropped again under its own name
        await scan_until(watcher, lambda: len(names(inbox / "done")) == 3, wait_until=wait_until)
        assert watcher.stats.duplicates == 1 and watcher.stats.started == 1
        assert len((await app.list_runs()).items) == 1
        sha = hashlib.sha256(b"same\n").hexdigest()
        assert names(inbox / "done") == sorted(["a.txt", f"a.{sha[:12]}.txt", "copy-of-a.txt"])


async def test_partial_hidden_unsettled_and_unmatched_files_are_left_alone(app, inbox):
    register(app)
    for name in (".hidden.csv", "upload.csv.part", "upload.tmp", "notes.md"):
        drop(inbox, name, b"x")
    drop(inbox, "fresh.csv", b"x", age=0)
    (inbox / "sub").mkdir()
    async with app:
        watcher = filedrop.FileDrop(app, inbox, workflow="ingest", pattern="*.csv", settle=30)
        await watcher.scan()
        assert (await app.list_runs()).items == []
    left = {".hidden.csv", "upload.csv.part", "upload.tmp", "notes.md", "fresh.csv", "sub"}
    assert set(names(inbox)) == left | {"done", "failed", "processing"}


async def test_a_large_file_is_passed_by_reference(app, inbox, wait_until):
    register(app)
    big = b"line of text\n" * 400_000  # 5.2 MB
    drop(inbox, "big.log", big)
    async with app, app.worker():
        watcher = filedrop.FileDrop(app, inbox, workflow="ingest", interval=0.05, settle=0)
        await scan_until(
            watcher, lambda: names(inbox / "done") == ["big.log"], wait_until=wait_until
        )
        run = (await app.list_runs()).items[0]
        assert run.output == {"name": "big.log", "lines": 400_000}
        assert len(json.dumps(run.input)) < 400 and run.input["size"] == len(big)


def test_watcher_configuration_is_checked(tmp_path):
    app = flowdesk.App("sqlite:///:memory:")
    register(app)
    with pytest.raises(errors.ConfigurationError):
        filedrop.FileDrop(app, tmp_path / "missing", workflow="ingest")
    with pytest.raises(errors.ConfigurationError):
        filedrop.FileDrop(app, tmp_path, workflow="ingest", interval=0)
    with pytest.raises(errors.ConfigurationError):
        filedrop.FileDrop(app, tmp_path, workflow="ingest", max_bytes=-1)
