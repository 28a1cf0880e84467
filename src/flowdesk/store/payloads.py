"""Payload encryption at rest: envelope keys, sealing and opening.

Every payload the store keeps (a run's input, output and error, step results and errors,
signal payloads, a task's context, draft and form data) is sealed before it is written:

* with AES-256-GCM, under the run's own **data key**;
* with ``run id \\x1f seq \\x1f payload kind`` as associated data, so a ciphertext copied
  to another row (another run, another step, another column) does not authenticate;
* as the text ``$fd1$<data key id>$<base64(nonce || ciphertext || tag)>`` in the same
  column it always had. A value without the prefix is plaintext from before encryption
  (or from a store with encryption off) and is read as it is.

Data keys live in the ``data_keys`` table, never in the clear: a run's key is wrapped
(AES-256-GCM too) by the current **master key**, or, when the run has data subjects, by a
key derived (HKDF-SHA256) from the keys of all its subjects, each wrapped by the master
key. Destroying a key (``wrapped`` set to NULL) makes everything sealed under it
unreadable for good: that is how a subject is erased and how retention ends a run's
payloads, while the rows, statuses, step names and the audit chain stay.

Master keys come from ``$FLOWDESK_MASTER_KEY`` (base64 keys, comma separated, the first is
current) or from a key file (``$FLOWDESK_MASTER_KEY_FILE``; by default next to a SQLite
database, else ``~/.config/flowdesk/master.key``), created with mode 0600 on first start.
A master key's id is derived from the key itself, so the id stored beside a wrapped key
names exactly the key that opens it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flowdesk import errors

log = logging.getLogger("flowdesk.keys")

PREFIX = "$fd1$"
KEY_ENV = "FLOWDESK_MASTER_KEY"
KEY_FILE_ENV = "FLOWDESK_MASTER_KEY_FILE"
SWITCH_ENV = "FLOWDESK_PAYLOAD_ENCRYPTION"
ERASED = "$erased"
SUBJECTS = "subjects:"
_NONCE = 12
_CACHE = 50_000


def erased_text(reason: str) -> str:
    """What an erased payload reads as: ``{"$erased": reason}`` (JSON text)."""
    return json.dumps({ERASED: reason})


def is_erased(value: object) -> bool:
    return isinstance(value, dict) and ERASED in value and len(value) == 1


def master_key_id(raw: bytes) -> str:
    return "mk-" + hashlib.sha256(b"flowdesk master key id\x00" + raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def _parse_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise errors.ConfigurationError(f"{where}: a master key is not base64: {exc}") from exc
    if len(raw) != 32:
        raise errors.ConfigurationError(
            f"{where}: a master key must be 32 bytes (AES-256), this one is {len(raw)}."
        )
    return raw


@dataclass(frozen=True, slots=True)
class MasterKeys:
    """The loaded master keys; ``raw[0]`` is current (new wraps use it)."""

    raw: tuple[bytes, ...]
    source: str

    @property
    def current_id(self) -> str:
        return master_key_id(self.raw[0])

    @property
    def ids(self) -> list[str]:
        return [master_key_id(k) for k in self.raw]

    def get(self, key_id: str) -> bytes:
        for k in self.raw:
            if master_key_id(k) == key_id:
                return k
        loaded = ", ".join(self.ids)
        raise errors.MasterKeyMissing(key_id, f" (loaded: {loaded} from {self.source})")


def default_key_file(database_url: str) -> Path:
    """``$FLOWDESK_MASTER_KEY_FILE``, else next to a SQLite database, else
    ``~/.config/flowdesk/master.key``."""
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV])
    if database_url.startswith("sqlite:") or database_url.endswith((".db", ".sqlite")):
        from flowdesk.store import sqlite

        path, _ = sqlite.parse_url(database_url)
        if path != ":memory:":
            return Path(path + ".master-key")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "flowdesk" / "master.key"


def read_key_file(path: Path) -> list[bytes]:
    """The keys in a key file: one base64 key a line, the current one first."""
    lines = [ln for ln in path.read_text("ascii").splitlines() if ln.strip()]
    keys = [_parse_key(ln.split()[-1], str(path)) for ln in lines if not ln.startswith("#")]
    if not keys:
        raise errors.ConfigurationError(f"Master key file {path} holds no key.")
    return keys


def write_key_file(path: Path, keys: Sequence[bytes], *, create: bool = False) -> None:
    """Write ``keys`` (current first) with mode 0600: through a new file linked (``create``:
    only when there is none yet) or renamed into place, so nobody reads a half file."""
    body = "".join(f"{master_key_id(k)} {base64.b64encode(k).decode('ascii')}\n" for k in keys)
    text = "# flowdesk master keys, current first. Back this file up; keep it secret.\n" + body
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path.with_name(f"{path.name}.{secrets.token_hex(6)}.new")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if create:
            os.link(target, path)  # FileExistsError when another process was first
        else:
            os.replace(target, path)
    finally:
        if create or target.exists():
            target.unlink(missing_ok=True)


def load_master_keys(database_url: str) -> MasterKeys | None:
    """The master keys for a store, from the environment or the key file (created on first
    start, its path logged and printed). None when ``$FLOWDESK_PAYLOAD_ENCRYPTION=off``."""
    if os.environ.get(SWITCH_ENV, "on").lower() in ("off", "0", "false", "no"):
        return None
    if os.environ.get(KEY_ENV):
        keys = [_parse_key(k, KEY_ENV) for k in os.environ[KEY_ENV].split(",") if k.strip()]
        return MasterKeys(tuple(keys), "$" + KEY_ENV)
    path = default_key_file(database_url)
    if not path.exists():
        try:
            write_key_file(path, [secrets.token_bytes(32)], create=True)
        except FileExistsError:
            pass  # another process created it first
        else:
            message = (
                f"flowdesk: created master key file {path} (mode 0600). Back it up: without "
                "it no stored payload can be read."
            )
            log.info("%s", message)  # logged for the record ...
            print(message, file=sys.stderr)  # noqa: T201 - ... and shown: it must be seen once
    return MasterKeys(tuple(read_key_file(path)), str(path))


class DataKey:
    """An unwrapped data key."""

    __slots__ = ("aead", "id", "raw")

    def __init__(self, key_id: str, raw: bytes) -> None:
        self.id = key_id
        self.raw = raw
        self.aead = AESGCM(raw)


_nonces = itertools.count()
_nonce_prefix = os.urandom(8)


def _new_nonces() -> None:
    global _nonces, _nonce_prefix
    _nonces, _nonce_prefix = itertools.count(), os.urandom(8)


os.register_at_fork(after_in_child=_new_nonces)  # a forked child never repeats its parent's


def _nonce() -> bytes:
    """A 96-bit GCM nonce: 64 random bits drawn once per process, then a 32-bit counter
    (drawn afresh after 2**32 nonces). Two processes sealing under the same key repeat a
    nonce only if their random halves collide (2**-64)."""
    n = next(_nonces)
    if n > 0xFFFFFFFF:
        _new_nonces()
        n = next(_nonces)
    return _nonce_prefix + n.to_bytes(4, "big")


def _ad(a: str, b: object, c: str, d: str = "") -> bytes:
    return f"{a}\x1f{b}\x1f{c}\x1f{d}".encode()


class Keyring:
    """Master keys plus a bounded in-memory cache of unwrapped data keys, so the hot path
    (a step's result) seals without a store round trip or an unwrap."""

    def __init__(self, masters: MasterKeys) -> None:
        self.masters = masters
        self._runs: OrderedDict[str, DataKey] = OrderedDict()
        self._unwrapped: OrderedDict[tuple[str, str], DataKey] = OrderedDict()
        self._aeads: dict[bytes, AESGCM] = {}
        self.index: DataKey | None = None

    def _aead(self, kek: bytes) -> AESGCM:
        aead = self._aeads.get(kek)
        if aead is None:
            if len(self._aeads) > 64:
                self._aeads.clear()
            aead = self._aeads[kek] = AESGCM(kek)
        return aead

    def reload(self, masters: MasterKeys) -> None:
        self.masters = masters

    def master(self, key_id: str) -> bytes:
        """Master key ``key_id``; the key file is read again once when it is not loaded
        (another process may have rotated)."""
        try:
            return self.masters.get(key_id)
        except errors.MasterKeyMissing:
            source = self.masters.source
            if source.startswith("$") or not Path(source).exists():
                raise
            self.masters = MasterKeys(tuple(read_key_file(Path(source))), source)
            return self.masters.get(key_id)

    # -- the run-key cache ---------------------------------------------------------------
    def cached(self, run_id: str) -> DataKey | None:
        return self._runs.get(run_id)

    def remember(self, run_id: str, key: DataKey) -> None:
        self._runs[run_id] = key
        if len(self._runs) > _CACHE:
            self._runs.popitem(last=False)

    def forget(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self._runs.pop(run_id, None)

    def peek(self, key_id: str, wrapped: str) -> DataKey | None:
        """The data key already unwrapped from this wrapped form, if any."""
        return self._unwrapped.get((key_id, wrapped))

    # -- wrapping ----------------------------------------------------------------------
    @staticmethod
    def new_key(kind: str) -> DataKey:
        prefix = {"run": "rk-", "subject": "sk-", "index": "ik-"}[kind]
        return DataKey(prefix + secrets.token_hex(10), secrets.token_bytes(32))

    @staticmethod
    def _kek(subject_keys: Sequence[DataKey]) -> bytes:
        material = b"".join(k.raw for k in sorted(subject_keys, key=lambda k: k.id))
        return HKDF(hashes.SHA256(), 32, None, b"flowdesk subjects kek").derive(material)

    def wrap(
        self, key: DataKey, kind: str, owner: str, subjects: Sequence[DataKey] = ()
    ) -> tuple[str, str]:
        """``(wrapped_by, wrapped)`` for a data key row."""
        if subjects:
            by = SUBJECTS + ",".join(sorted(k.id for k in subjects))
            kek = self._kek(subjects)
        else:
            by = self.masters.current_id
            kek = self.masters.raw[0]
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._aead(kek).encrypt(nonce, key.raw, _ad(kind, owner, key.id + "\x1f" + by))
        wrapped = _b64(nonce + sealed)
        self._keep((key.id, wrapped), key)
        return by, wrapped

    def unwrap(
        self,
        key_id: str,
        kind: str,
        owner: str,
        wrapped_by: str,
        wrapped: str,
        subjects: Sequence[DataKey] = (),
    ) -> DataKey:
        hit = self._unwrapped.get((key_id, wrapped))
        if hit is not None:
            return hit
        if wrapped_by.startswith(SUBJECTS):
            kek = self._kek(subjects)
        else:
            kek = self.master(wrapped_by)
        blob = _unb64(wrapped)
        try:
            raw = self._aead(kek).decrypt(
                blob[:_NONCE], blob[_NONCE:], _ad(kind, owner, key_id + "\x1f" + wrapped_by)
            )
        except InvalidTag:
            raise errors.PayloadTampered(key_id, f"key of {kind} {owner!r}") from None
        key = DataKey(key_id, raw)
        self._keep((key_id, wrapped), key)
        return key

    def _keep(self, where: tuple[str, str], key: DataKey) -> None:
        self._unwrapped[where] = key
        if len(self._unwrapped) > _CACHE:
            self._unwrapped.popitem(last=False)

    # -- payloads ----------------------------------------------------------------------
    @staticmethod
    def seal(key: DataKey, run_id: str, seq: int, kind: str, text: str) -> str:
        nonce = _nonce()
        body = key.aead.encrypt(nonce, text.encode(), f"{run_id}\x1f{seq}\x1f{kind}\x1f".encode())
        return f"{PREFIX}{key.id}${binascii.b2a_base64(nonce + body, newline=False).decode()}"

    @staticmethod
    def key_id_of(stored: str) -> str | None:
        """The data key id written beside a sealed payload; None for plaintext."""
        if not stored.startswith(PREFIX):
            return None
        return stored[len(PREFIX) :].split("$", 1)[0]

    @staticmethod
    def open(key: DataKey, run_id: str, seq: int, kind: str, stored: str) -> str:
        where = f"{kind} of run {run_id} at seq {seq}"
        try:
            key_id, body = stored[len(PREFIX) :].split("$", 1)
            blob = _unb64(body)
        except ValueError:
            raise errors.PayloadTampered("?", where) from None
        if key_id != key.id:
            raise errors.PayloadTampered(key_id, where + f" (the run's key is {key.id})")
        try:
            plain = key.aead.decrypt(blob[:_NONCE], blob[_NONCE:], _ad(run_id, seq, kind))
        except InvalidTag:
            raise errors.PayloadTampered(key_id, where) from None
        return plain.decode("utf-8")

    def keyed_hash(self, text: str) -> str:
        """HMAC-SHA256 under the index key: compares inputs without a guessable plain hash."""
        assert self.index is not None, "load the index key first"
        return hmac.new(self.index.raw, text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
