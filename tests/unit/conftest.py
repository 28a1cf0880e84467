"""Shared fixtures for the in-process unit tests: one SQLite file per test."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import flowdesk

POLL = 0.05


Predicate = Callable[[], Any | Awaitable[Any]]


async def _wait_until(
    predicate: Predicate, *, timeout: float = 15.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate!r}")
        await asyncio.sleep(interval)


async def _wait_status(
    app: flowdesk.App, run_id: str, status: flowdesk.RunStatus | str, timeout: float = 15.0
) -> flowdesk.Run:
    async def check() -> flowdesk.Run | None:
        run = await app.get_run(run_id)
        return run if run.status == status else None

    run: flowdesk.Run = await _wait_until(
        check, timeout=timeout, what=f"run {run_id} becomes {status}"
    )
    return run


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "t.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def app(db_url: str) -> flowdesk.App:
    """A fresh, unopened App on its own database file."""
    return flowdesk.App(db_url, poll_interval=POLL)


@pytest.fixture
def make_app(db_url: str) -> Callable[..., flowdesk.App]:
    """More App objects on the same database file (another process, in effect)."""

    def make(**kwargs: Any) -> flowdesk.App:
        kwargs.setdefault("poll_interval", POLL)
        return flowdesk.App(db_url, **kwargs)

    return make


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    return _wait_until


@pytest.fixture
def wait_status() -> Callable[..., Awaitable[flowdesk.Run]]:
    return _wait_status


@pytest.fixture
def query(db_path: Path) -> Callable[..., list[tuple[Any, ...]]]:
    """Read the database file directly, on a connection of its own."""

    def run(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    return run
