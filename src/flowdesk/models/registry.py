"""Versioned local classifiers on disk, with their metrics and rollout state.

Layout under the models directory (``$FLOWDESK_MODELS_DIR``, else ``./flowdesk-models``)::

    <task>/
        state.json          current version, canary {version, percent}, shadow {version},
                            history of changes (rollback walks it back)
        v1/model.joblib     the pickled `flowdesk.models.training.LocalClassifier`
        v1/meta.json        created_at, data file hash, example count, labels, features,
                            metrics, out-of-scope label and threshold
        v2/...

A version directory is written under a temporary name and renamed into place, so it is
complete or absent, and two processes registering at once get different numbers; versions
never change after that. ``state.json`` is replaced atomically (``os.replace``) under an
exclusive lock on ``<task>/.lock``, so concurrent promotions never lose an update.

The first version registered for a task becomes current; later ones wait for `promote`
(or a canary or shadow rollout, which the gateway reads from `Registry.state`).

Artifacts are pickles: load models only from a directory you trust, as you would code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib

from flowdesk import errors
from flowdesk.models import training

ENV_DIR = "FLOWDESK_MODELS_DIR"
DEFAULT_DIR = "flowdesk-models"
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_HISTORY_LIMIT = 200

_cache: dict[tuple[str, str, str], training.LocalClassifier] = {}
_cache_lock = threading.Lock()


def default_dir() -> Path:
    """``$FLOWDESK_MODELS_DIR``, else ``./flowdesk-models``."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


@dataclass(frozen=True, slots=True, kw_only=True)
class Canary:
    version: str
    percent: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskState:
    """Which version answers, which takes a share of traffic, which runs in the shadow."""

    task: str
    current: str | None = None
    canary: Canary | None = None
    shadow: str | None = None
    history: tuple[dict[str, Any], ...] = ()
    previous: tuple[str, ...] = ()  # earlier current versions, most recent last

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "current": self.current,
            "canary": None
            if self.canary is None
            else {"version": self.canary.version, "percent": self.canary.percent},
            "shadow": None if self.shadow is None else {"version": self.shadow},
            "previous": list(self.previous),
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, task: str, data: dict[str, Any]) -> TaskState:
        canary = data.get("canary")
        shadow = data.get("shadow")
        return cls(
            task=task,
            current=data.get("current"),
            canary=None
            if not canary
            else Canary(version=str(canary["version"]), percent=float(canary["percent"])),
            shadow=None if not shadow else str(shadow["version"]),
            history=tuple(data.get("history") or ()),
            previous=tuple(data.get("previous") or ()),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    """One registered version and its metadata (``meta.json``)."""

    task: str
    version: str
    created_at: str
    metrics: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _number(version: str) -> int:
    match = _VERSION.match(version)
    return int(match.group(1)) if match else 0


def check_task_name(task: str) -> str:
    """``task`` when it can name a folder of the registry, else `ModelRegistryError`."""
    if not _TASK_NAME.match(task):
        raise errors.ModelRegistryError(
            f"Bad model task name {task!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit (at most 128 characters)."
        )
    return task


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Registry:
    """Local classifiers by task and version under one directory (see the module docstring).

    Independent of any `flowdesk.App`; safe to share between threads and processes.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_dir()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    # -- reading --------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        """Tasks with at least one version, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.path.iterdir()
            if entry.is_dir() and _TASK_NAME.match(entry.name) and self._version_names(entry.name)
        )

    def versions(self, task: str) -> list[VersionInfo]:
        """Every version of ``task``, oldest first."""
        names = self._version_names(self._checked(task))
        if not names:
            raise self._unknown(task)
        return [self._info(task, name) for name in names]

    def version(self, task: str, version: str) -> VersionInfo:
        """One version's metadata."""
        self._require_version(task, version)
        return self._info(task, version)

    def state(self, task: str) -> TaskState:
        """Current, canary and shadow versions of ``task``."""
        self._checked(task)
        if not self._version_names(task):
            raise self._unknown(task)
        return self._read_state(task)

    def get(self, task: str, version: str | None = None) -> training.LocalClassifier:
        """The classifier of ``version`` (default: the current one), loaded once per process."""
        if version is None:
            current = self.state(task).current
            if current is None:
                raise errors.ModelNotFound(task, "current", self._version_names(task), str(self))
            version = current
        key = (str(self.path.resolve()), task, version)
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:  # versions never change once registered
            return hit
        self._require_version(task, version)
        loaded = joblib.load(self.path / task / version / "model.joblib")
        if not isinstance(loaded, training.LocalClassifier):
            raise errors.ModelRegistryError(
                f"{self.path / task / version / 'model.joblib'} does not hold a local classifier"
            )
        with _cache_lock:
            return _cache.setdefault(key, loaded)

    # -- changing -------------------------------------------------------------------------
    def register(
        self, task: str, artifact: training.LocalClassifier, meta: dict[str, Any] | None = None
    ) -> str:
        """Store ``artifact`` with ``meta`` as the next version of ``task``; return it
        (``"v1"``, ``"v2"``, ...). The first version of a task becomes current."""
        self._checked(task)
        folder = self.path / task
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".staging-{secrets.token_hex(6)}"
        staging.mkdir()
        try:
            joblib.dump(artifact, staging / "model.joblib")
            while True:
                names = self._version_names(task)
                version = f"v{(_number(names[-1]) if names else 0) + 1}"
                record = dict(meta or {})
                record.update(task=task, version=version)
                record.setdefault("created_at", _now())
                _write_json(staging / "meta.json", record)
                try:
                    os.rename(staging, folder / version)  # fails if another process took it
                    break
                except OSError:
                    if not (folder / version).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._locked(task) as state:
            if state.current is None:
                state = replace(state, current=version)
            self._save(task, state, self._event("register", version=version, current=state.current))
        return version

    def promote(self, task: str, version: str) -> TaskState:
        """Make ``version`` current (a canary or shadow of it ends)."""
        self._require_version(task, version)
        with self._locked(task) as state:
            if state.current == version:
                return state
            new = replace(
                state,
                current=version,
                canary=None if state.canary and state.canary.version == version else state.canary,
                shadow=None if state.shadow == version else state.shadow,
                previous=state.previous + ((state.current,) if state.current else ()),
            )
            return self._save(task, new, self._event("promote", frm=state.current, to=version))

    def rollback(self, task: str) -> TaskState:
        """Make the version that was current before the current one current again."""
        self._checked(task)
        if not self._version_names(task):
            raise self._unknown(task)
        with self._locked(task) as state:
            if not state.previous:
                raise errors.ModelRegistryError(
                    f"Nothing to roll back to: {task!r} has had only one current version "
                    f"({state.current}). Promote another version first."
                )
            back = state.previous[-1]
            new = replace(state, current=back, previous=state.previous[:-1])
            return self._save(task, new, self._event("rollback", frm=state.current, to=back))

    def set_canary(self, task: str, version: str | None, percent: float = 0.0) -> TaskState:
        """Send ``percent`` (0-100) of the traffic to ``version``; ``None`` or 0 ends it."""
        if version is not None:
            self._require_version(task, version)
        else:
            self.state(task)
        if not 0.0 <= percent <= 100.0:
            raise errors.ModelRegistryError(f"canary percent must be 0-100, not {percent}")
        with self._locked(task) as state:
            canary = None
            if version is not None and percent > 0:
                canary = Canary(version=version, percent=percent)
            if canary is not None and canary.version == state.current:
                raise errors.ModelRegistryError(
                    f"{version} is already the current version of {task!r}; a canary must be "
                    "another version"
                )
            event = self._event("canary", version=version, percent=percent)
            return self._save(task, replace(state, canary=canary), event)

    def set_shadow(self, task: str, version: str | None) -> TaskState:
        """Run ``version`` beside the current one (answers recorded, never returned);
        ``None`` stops it."""
        if version is not None:
            self._require_version(task, version)
        else:
            self.state(task)
        with self._locked(task) as state:
            if version is not None and version == state.current:
                raise errors.ModelRegistryError(
                    f"{version} is already the current version of {task!r}; a shadow must be "
                    "another version"
                )
            return self._save(
                task, replace(state, shadow=version), self._event("shadow", version=version)
            )

    # -- internals ------------------------------------------------------------------------
    def __str__(self) -> str:
        return str(self.path)

    def _checked(self, task: str) -> str:
        return check_task_name(task)

    def _unknown(self, task: str) -> errors.ModelNotFound:
        return errors.ModelNotFound(task, None, self.tasks(), str(self))

    def _version_names(self, task: str) -> list[str]:
        folder = self.path / task
        if not folder.is_dir():
            return []
        names = [
            entry.name
            for entry in folder.iterdir()
            if _VERSION.match(entry.name) and (entry / "meta.json").exists()
        ]
        return sorted(names, key=_number)

    def _require_version(self, task: str, version: str) -> None:
        names = self._version_names(self._checked(task))
        if not names:
            raise self._unknown(task)
        if version not in names:
            raise errors.ModelNotFound(task, version, names, str(self))

    def _info(self, task: str, version: str) -> VersionInfo:
        meta = json.loads((self.path / task / version / "meta.json").read_text("utf-8"))
        return VersionInfo(
            task=task,
            version=version,
            created_at=str(meta.get("created_at", "")),
            metrics=dict(meta.get("metrics") or {}),
            meta=meta,
        )

    def _read_state(self, task: str) -> TaskState:
        path = self.path / task / "state.json"
        if not path.exists():
            return TaskState(task=task)
        try:
            data = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as exc:
            raise errors.ModelRegistryError(f"{path} is not valid JSON: {exc.msg}") from exc
        return TaskState.from_dict(task, data)

    @contextlib.contextmanager
    def _locked(self, task: str) -> Iterator[TaskState]:
        folder = self.path / task
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield self._read_state(task)
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _event(self, action: str, **data: Any) -> dict[str, Any]:
        if "frm" in data:
            data["from"] = data.pop("frm")
        return {"at": _now(), "action": action, **data}

    def _save(self, task: str, state: TaskState, event: dict[str, Any] | None = None) -> TaskState:
        history = state.history + ((event,) if event else ())
        new = replace(
            state, history=history[-_HISTORY_LIMIT:], previous=state.previous[-_HISTORY_LIMIT:]
        )
        _write_json(self.path / task / "state.json", new.as_dict())
        return new
