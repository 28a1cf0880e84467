"""Run peer engines in their own virtual environments for comparison benchmarks.

Peer engines (currently DBOS Transact) are installed from PyPI into isolated virtual
environments under ``<repo>/.bench/<name>`` so they never mix with flowdesk's own
dependencies. Each peer has a standalone workload script next to this module that is
executed with the peer's interpreter and prints a single JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
VENVS_DIR = REPO_ROOT / ".bench"

# Newest DBOS release on PyPI at the time of writing; the workload script relies on
# the 3.x configuration keys (``system_database_url``, ``run_admin_server``).
DBOS_REQUIREMENTS = ["dbos==3.4.0"]

_MARKER = "requirements.json"
_RUN_TIMEOUT_S = 600
_INSTALL_TIMEOUT_S = 900


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_venv(name: str, requirements: list[str]) -> pathlib.Path:
    """Create (once) ``<repo>/.bench/<name>`` with ``requirements`` installed.

    A marker file records the requirement list that was installed; an existing venv
    whose marker matches is reused as is, otherwise it is rebuilt from scratch.
    Returns the path of the venv's python executable.
    """
    venv = VENVS_DIR / name
    python = _venv_python(venv)
    marker = venv / _MARKER
    wanted = sorted(requirements)
    if python.exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == wanted:
                return python
        except (OSError, ValueError):
            pass  # unreadable marker: rebuild below

    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    # --clear wipes a stale or half-built venv so the result matches the marker exactly.
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        check=True,
        timeout=_INSTALL_TIMEOUT_S,
    )
    if wanted:
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *wanted],
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT_S,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip install {' '.join(wanted)} into {venv} failed "
                f"(exit {proc.returncode}):\n{_tail(proc.stderr or proc.stdout)}"
            )
    # Written last: a venv without a marker is treated as incomplete.
    marker.write_text(json.dumps(wanted))
    return python


def _run_json(python: pathlib.Path, script: pathlib.Path, args: list[str]) -> dict[str, Any]:
    cmd = [str(python), str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise RuntimeError(
            f"{script.name} timed out after {_RUN_TIMEOUT_S}s:\n{_tail(stderr)}"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
    try:
        result = json.loads(proc.stdout)
    except ValueError as exc:
        raise RuntimeError(
            f"{script.name} printed invalid JSON: {proc.stdout[-500:]!r}\n{_tail(proc.stderr)}"
        ) from exc
    if not isinstance(result, dict):
        raise RuntimeError(f"{script.name} printed {type(result).__name__}, expected an object")
    return result


def run_dbos(
    db_path: pathlib.Path,
    synchronous: str,
    steps: int,
    workflows: int,
    concurrency: int,
) -> dict[str, Any]:
    """Run the DBOS workload against a SQLite system database at ``db_path``.

    ``synchronous`` is ``"full"`` or ``"normal"`` (SQLite ``PRAGMA synchronous``, always
    in WAL mode). Returns the JSON object printed by ``_dbos_workload.py``.
    """
    python = ensure_venv("dbos", DBOS_REQUIREMENTS)
    args = [
        "--db",
        str(db_path),
        "--synchronous",
        synchronous,
        "--steps",
        str(steps),
        "--workflows",
        str(workflows),
        "--concurrency",
        str(concurrency),
    ]
    return _run_json(python, BENCH_DIR / "_dbos_workload.py", args)


def dbos_python() -> pathlib.Path:
    """The python of the ``dbos`` virtual environment (built on first use), to run the
    DBOS side of a benchmark in processes of its own (see ``_dbos_scale.py``)."""
    return ensure_venv("dbos", DBOS_REQUIREMENTS)


PYSPY_REQUIREMENTS = ["py-spy==0.4.3"]


def pyspy_binary() -> pathlib.Path:
    """The ``py-spy`` sampling profiler (from PyPI, in ``<repo>/.bench/pyspy``)."""
    python = ensure_venv("pyspy", PYSPY_REQUIREMENTS)
    return python.with_name("py-spy.exe" if os.name == "nt" else "py-spy")
