"""File drop: every file put in a watched folder starts one run, exactly once.

The watcher polls the folder (portable: no inotify) and keeps its state in the folder
itself, in three sub-folders it creates::

    FOLDER/            new files land here (names starting with "." or ending with .part,
                       .tmp or .partial are left alone: write under such a name, then rename)
    FOLDER/processing/<sha256>/<name>     taken: its run is started or about to be
    FOLDER/done/<name>                    its run succeeded
    FOLDER/failed/<name>                  its run failed or was cancelled, or the file could
    FOLDER/failed/<name>.reason.json      not be read or its input was refused; why

A file is taken once it has not changed for ``settle`` seconds. The watcher hashes it
(SHA-256), moves it into ``processing/<sha256>/`` (a rename: atomic), then starts the run with
idempotency key ``filedrop:<workflow>:<sha256>``, and moves the file to ``done/`` or
``failed/`` when the run ends. Every move is a rename within the folder's file system, so a
file is always in exactly one place; after a crash at any point, the next watcher finds it
where it was left: still new (hashed again, same key), or in ``processing/`` (started again
with the same key, which returns the run already started). A file is never lost and never
starts two runs.

The run's input is a reference, never the bytes: ``{"path", "name", "sha256", "size"}``
(`DroppedFile`), where ``path`` is the absolute path in ``processing/`` while the run is
active; after it ends, the file is in ``done/`` or ``failed/`` under ``name``. Give the
workflow one `DroppedFile` parameter (or ``path``, ``name``, ``sha256``, ``size``), or pass
``to_input`` to build other input from the reference.

A file with the same content as one seen before (same SHA-256) but another name cannot
start a second run (the key is the content's): it goes to ``done/`` and is counted in
`Stats.duplicates`. One watcher per folder.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store.base import RunStatus
from flowdesk.triggers import crash

log = logging.getLogger("flowdesk.triggers")

AFTER_CLAIM = "filedrop:after_claim"
AFTER_START = "filedrop:after_start"
_SKIPPED_SUFFIXES = (".part", ".tmp", ".partial")
_CHUNK = 1024 * 1024


class DroppedFile(pydantic.BaseModel):
    """The reference a file-drop run gets as input."""

    path: str
    name: str
    sha256: str
    size: int


@dataclass(slots=True)
class Stats:
    """What a watcher did since it started."""

    started: int = 0  # runs created
    resumed: int = 0  # files found in processing/ (or again) whose run already existed
    duplicates: int = 0  # same content as an earlier file with another name
    done: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class _Tracked:
    path: Path  # in processing/
    run_id: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _free_name(folder: Path, name: str, sha: str) -> Path:
    """``folder/name``, or ``folder/<stem>.<sha12><suffix>`` when that is taken."""
    target = folder / name
    if not target.exists():
        return target
    stem, dot, suffix = name.rpartition(".")
    if not stem:
        stem, dot, suffix = name, "", ""
    target = folder / f"{stem}.{sha[:12]}{dot}{suffix}"
    n = 1
    while target.exists():
        target = folder / f"{stem}.{sha[:12]}-{n}{dot}{suffix}"
        n += 1
    return target


class FileDrop:
    """Watches ``folder`` and starts ``workflow`` once per file (see the module docstring)."""

    def __init__(
        self,
        app: App,
        folder: str | Path,
        *,
        workflow: str | Callable[..., Any],
        pattern: str = "*",
        interval: float = 1.0,
        settle: float = 1.0,
        max_bytes: int | None = None,
        to_input: Callable[[DroppedFile], Any] | None = None,
    ) -> None:
        if interval <= 0 or settle < 0:
            raise errors.ConfigurationError("interval must be > 0 and settle >= 0 seconds")
        if max_bytes is not None and max_bytes < 0:
            raise errors.ConfigurationError("max_bytes must be >= 0")
        self.app = app
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise errors.ConfigurationError(f"{self.folder} is not a folder: create it first.")
        self.workflow = app.workflow_name(workflow)
        self.pattern = pattern
        self.interval = interval
        self.settle = settle
        self.max_bytes = max_bytes
        self.to_input = to_input
        self.processing = self.folder / "processing"
        self.done = self.folder / "done"
        self.failed = self.folder / "failed"
        self.stats = Stats()
        self._tracked: dict[Path, _Tracked] = {}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop after the current pass. Idempotent."""
        self._stopping.set()

    async def run(self) -> None:
        """Scan every ``interval`` seconds until `stop`."""
        await self.app.open()
        while not self._stopping.is_set():
            await self.scan()
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass

    async def scan(self) -> None:
        """One pass: take new files, recover files in ``processing/``, move finished ones."""
        await self.app.open()
        for sub in (self.processing, self.done, self.failed):
            sub.mkdir(exist_ok=True)
        for path in self._new_files():
            await self._take(path)
        await self._recover()
        await self._settle_finished()

    # -- new files ---------------------------------------------------------------------
    def _new_files(self) -> list[Path]:
        now = time.time()
        found = []
        for entry in sorted(self.folder.iterdir()):
            name = entry.name
            if name.startswith(".") or name.endswith(_SKIPPED_SUFFIXES):
                continue
            if not fnmatch.fnmatchcase(name, self.pattern):
                continue
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue
            if not entry.is_file() or entry.is_symlink():
                continue
            if now - st.st_mtime < self.settle:
                continue  # still being written, perhaps
            found.append(entry)
        return found

    async def _take(self, path: Path) -> None:
        claimed = await asyncio.to_thread(self._claim, path)
        if claimed is not None:
            crash.point(AFTER_CLAIM)
            await self._start(*claimed)

    def _claim(self, path: Path) -> tuple[Path, str] | None:
        """Hash a new file and move it into ``processing/<sha256>/`` (runs in a thread)."""
        try:
            size = path.stat().st_size
            if self.max_bytes is not None and size > self.max_bytes:
                reason = f"{size} bytes is more than max_bytes={self.max_bytes}"
                self._fail_file(path, None, reason, None)
                return None
            sha = sha256_of(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._fail_file(path, None, f"cannot read the file: {exc.strerror or exc}", None)
            return None
        slot = self.processing / sha
        slot.mkdir(exist_ok=True)
        claimed = slot / path.name
        try:
            os.replace(path, claimed)
        except FileNotFoundError:
            return None  # taken meanwhile
        _sync_dir(slot)
        _sync_dir(self.folder)
        return claimed, sha

    # -- processing/ ---------------------------------------------------------------------
    async def _recover(self) -> None:
        """Files in ``processing/`` that this watcher does not track (a previous watcher
        died, or the start failed): start them again; the key finds the run if it exists."""
        for slot in sorted(self.processing.iterdir()):
            if not slot.is_dir():
                continue
            files = [p for p in sorted(slot.iterdir()) if p.is_file()]
            if not files:
                _remove_empty(slot)
                continue
            for path in files:
                if path not in self._tracked:
                    await self._start(path, slot.name)

    async def _start(self, path: Path, sha: str) -> None:
        size = _size(path)
        if size is None:
            return
        ref = DroppedFile(path=str(path), name=path.name, sha256=sha, size=size)
        key = f"filedrop:{self.workflow}:{sha}"
        try:
            value: Any = self.to_input(ref) if self.to_input is not None else ref.model_dump()
            handle = await self.app.start(self.workflow, value, idempotency_key=key)
        except (ValueError, TypeError, errors.InvalidInput, errors.SerializationError) as exc:
            self._fail_file(path, None, f"the input was refused: {exc}", sha)
            return
        except errors.IdempotencyConflict:
            log.warning("%s has the same content as an earlier file: not started again", path)
            self.stats.duplicates += 1
            self._move(path, self.done, sha)
            return
        except (errors.ConfigurationError, errors.UnknownWorkflow):
            raise
        except Exception as exc:  # the store: keep the file in processing/, try next pass
            log.warning("%s: the run could not be started (%s); trying again", path, exc)
            return
        if handle.created:
            self.stats.started += 1
            log.info("%s started run %s", path.name, handle.id)
        else:
            self.stats.resumed += 1
        self._tracked[path] = _Tracked(path, handle.id)
        crash.point(AFTER_START)

    async def _settle_finished(self) -> None:
        for path, tracked in list(self._tracked.items()):
            try:
                run = await self.app.get_run(tracked.run_id)
            except errors.RunNotFound:  # the run was purged: nothing waits for the file
                run = None
            if run is not None and not run.status.finished:
                continue
            del self._tracked[path]
            if not path.exists():
                continue
            sha = path.parent.name
            if run is None or run.status is RunStatus.SUCCEEDED:
                self._move(path, self.done, sha)
                self.stats.done += 1
                continue
            error = run.error or {}
            reason = f"run {run.id} {run.status.value}: {error.get('type')}: {error.get('message')}"
            self._fail_file(path, run.id, reason, sha)

    # -- moves -----------------------------------------------------------------------------
    def _fail_file(self, path: Path, run_id: str | None, reason: str, sha: str | None) -> None:
        log.warning("%s failed: %s", path.name, reason)
        target = _free_name(self.failed, path.name, sha or "unhashed")
        note = target.with_name(target.name + ".reason.json")
        note.write_text(
            json.dumps(
                {"file": path.name, "sha256": sha, "run_id": run_id, "reason": reason},
                indent=2,
                ensure_ascii=False,
            ),
            "utf-8",
        )
        self._move(path, self.failed, sha or "unhashed", target)
        self.stats.failed += 1

    def _move(self, path: Path, folder: Path, sha: str, target: Path | None = None) -> None:
        target = target or _free_name(folder, path.name, sha)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        _sync_dir(folder)
        if path.parent.parent == self.processing:
            _remove_empty(path.parent)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (fsync of the directory, where supported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
