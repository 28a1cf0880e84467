"""Data subjects: what is stored about one (a subject-access export), erasure by key
destruction, and master key rotation.

Payloads are sealed at rest by the store (`flowdesk.store.payloads`). A run is tied to
data subjects by ``app.start(..., subjects=[...])`` or ``ctx.add_subject(...)``; its data
key is then wrapped by a key derived from its subjects' keys. `erase` destroys the
subject's key and the keys of its runs in one transaction with its audit record, and
cancels the subject's unfinished runs; their rows stay, their payloads read as erased.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import payloads, sql_privacy

_BATCH = 500


def is_erased(value: Any) -> bool:
    """Whether an opened payload is the marker of an erased one (``{"$erased": ...}``)."""
    return payloads.is_erased(value)


async def export(app: App, subject: str) -> dict[str, Any]:
    """Everything stored about ``subject``: its runs with their input, output, error, steps,
    signals and human tasks (context, draft, form data), for a subject-access request."""
    sql_privacy.check_subject(subject)
    await app.open()
    store = app.store
    runs: list[dict[str, Any]] = []
    for run_id in await store.subject_runs(subject):
        run = await app.get_run(run_id)
        tasks = (await store.list_tasks(_task_query(run_id))).items
        runs.append(
            {
                "id": run.id,
                "workflow": run.workflow,
                "status": run.status.value,
                "created_at": run.created_at,
                "finished_at": run.finished_at,
                "subjects": await store.run_subjects(run_id),
                "erased": is_erased(run.input),
                "input": run.input,
                "output": run.output,
                "error": run.error,
                "steps": [
                    {
                        "seq": st.seq,
                        "name": st.name,
                        "kind": st.kind,
                        "status": st.status,
                        "output": st.output,
                        "error": st.error,
                    }
                    for st in await store.steps(run_id)
                ],
                "signals": await store.signals_of(run_id),
                "tasks": [
                    {
                        "id": t.id,
                        "title": t.title,
                        "status": t.status.value,
                        "context": t.context,
                        "draft": t.draft,
                        "result": t.result,
                        "completed_by": t.completed_by,
                        "completed_at": t.completed_at,
                    }
                    for t in tasks
                ],
            }
        )
    return {"subject": subject, "runs": runs}


def _task_query(run_id: str) -> Any:
    from flowdesk.store import people

    return people.TaskQuery(run_id=run_id, limit=500)


async def erase(
    app: App, subject: str, reason: str = "", actor: str | None = None
) -> dict[str, Any]:
    """Erase ``subject`` (see the module docstring). Returns what was erased: the runs,
    those cancelled because they had not finished, and the destroyed key ids."""
    sql_privacy.check_subject(subject)
    await app.open()
    result: dict[str, Any] = await app.submit(
        lambda tx: tx.erase_subject(subject, reason), actor=actor
    )
    for run_id in result["cancelled"]:
        for worker in app._workers:
            worker.interrupt(run_id, "cancel")
        app._finished(run_id)
    return result


async def rotate(app: App, key_file: Path | None = None) -> dict[str, Any]:
    """Introduce a new master key and wrap every data key with it; payload ciphertexts do
    not change. The key file (``key_file``, else the store's) gets the new key first and
    keeps the old ones, so processes still running with them keep reading; retire an old
    key with `retire` once no data key needs it."""
    await app.open()
    ring = _keyring(app)
    path = key_file or _key_file(ring)
    old = payloads.read_key_file(path)
    new = secrets.token_bytes(32)
    payloads.write_key_file(path, [new, *old])
    ring.reload(payloads.MasterKeys((new, *old), str(path)))
    total = 0
    while True:
        n: int = await app.submit(lambda tx: tx.rewrap_keys(_BATCH), actor="system:keys")
        total += n
        if n < _BATCH:
            break
    return {"key_id": payloads.master_key_id(new), "rewrapped": total, "file": str(path)}


async def retire(app: App, key_id: str, key_file: Path | None = None) -> None:
    """Remove master key ``key_id`` from the key file, once no data key is wrapped by it."""
    await app.open()
    ring = _keyring(app)
    path = key_file or _key_file(ring)
    keys = payloads.read_key_file(path)
    if payloads.master_key_id(keys[0]) == key_id:
        raise errors.ConfigurationError(
            f"{key_id} is the current master key: rotate first (flowdesk keys rotate)."
        )
    if key_id not in [payloads.master_key_id(k) for k in keys]:
        raise errors.ConfigurationError(f"No master key {key_id} in {path}.")
    usage = await app.store.key_usage()
    if usage.get(key_id):
        raise errors.ConfigurationError(
            f"{usage[key_id]} data key(s) are still wrapped by {key_id}: run "
            "`flowdesk keys rotate` again before retiring it."
        )
    kept = [k for k in keys if payloads.master_key_id(k) != key_id]
    payloads.write_key_file(path, kept)
    ring.reload(payloads.MasterKeys(tuple(kept), str(path)))


def _keyring(app: App) -> payloads.Keyring:
    ring: payloads.Keyring | None = getattr(app.store, "keys", None)
    if ring is None:
        raise errors.ConfigurationError(
            "Payload encryption is off ($FLOWDESK_PAYLOAD_ENCRYPTION=off): there are no keys."
        )
    return ring


def _key_file(ring: payloads.Keyring) -> Path:
    source = ring.masters.source
    if source.startswith("$"):
        raise errors.ConfigurationError(
            f"The master keys come from {source}: rotate by setting a new key first in that "
            "variable (comma separated, old ones after it), or pass --key-file."
        )
    return Path(source)
