"""Credentials for connectors: from environment variables or a secrets file, never from
workflow input.

A `Secret` wraps one value and never shows it: ``str``, ``repr`` and f-strings print
``***``; only `Secret.reveal` gives the value, at the moment a connector puts it on the
wire. Connectors also keep a list of their secrets so that audit data, error messages
and logs can be scrubbed of them (`scrub`).

Where secrets come from (`load`):

* a secrets file (TOML or JSON), named by the ``file`` argument or ``$FLOWDESK_SECRETS_FILE``;
  it must belong to the user running flowdesk and be readable by that user only (mode
  ``0600`` or stricter), the rule ssh applies to private keys. Names are dotted paths into
  its tables: ``crm.token`` is ``[crm] token = "..."``;
* environment variables: ``crm.token`` is ``$FLOWDESK_SECRET_CRM_TOKEN`` (the name upper-cased,
  every character other than a letter or digit turned into ``_``).

The file wins when both have a name.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flowdesk import errors

ENV_PREFIX = "FLOWDESK_SECRET_"
FILE_ENV = "FLOWDESK_SECRETS_FILE"
MASK = "***"

__all__ = ["ENV_PREFIX", "FILE_ENV", "MASK", "Secret", "Secrets", "env_name", "load", "scrub"]


class Secret:
    """A credential. Prints as ``***``; `reveal` returns the value."""

    __slots__ = ("_value", "name")

    def __init__(self, value: str, name: str = "secret") -> None:
        if not isinstance(value, str) or not value:
            raise errors.ConfigurationError(f"secret {name!r} is empty or not a string")
        self._value = value
        self.name = name

    def reveal(self) -> str:
        """The value itself: only for putting it on the wire."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, {MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __reduce__(self) -> Any:
        raise TypeError(f"secret {self.name!r} cannot be pickled")


def env_name(name: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable that holds secret ``name`` (``crm.token`` →
    ``FLOWDESK_SECRET_CRM_TOKEN``)."""
    return prefix + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _check_mode(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise errors.ConfigurationError(f"no secrets file at {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise errors.ConfigurationError(f"the secrets file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise errors.ConfigurationError(
            f"the secrets file {path} has mode {mode:04o}: other users may read it. "
            f"Run `chmod 600 {path}` (flowdesk reads it only when the owner alone can)."
        )
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise errors.ConfigurationError(
            f"the secrets file {path} belongs to uid {info.st_uid}, not to the user running "
            f"flowdesk (uid {os.getuid()}): `chown` it to that user."
        )


def _read_file(path: Path) -> dict[str, Any]:
    _check_mode(path)
    raw = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        # The parser's message may quote a line of the file: keep only where it failed.
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise errors.ConfigurationError(
            f"the secrets file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}"
            f"{where}"
        ) from None
    if not isinstance(data, dict):
        raise errors.ConfigurationError(f"the secrets file {path} must hold a table (an object)")
    return data


class Secrets:
    """Named secrets from a file (see the module docstring) and the environment."""

    def __init__(
        self,
        file: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        env_prefix: str = ENV_PREFIX,
    ) -> None:
        self.path = None if file is None else Path(file)
        self._file: dict[str, Any] = {} if self.path is None else _read_file(self.path)
        self._env = os.environ if env is None else env
        self.env_prefix = env_prefix

    def _from_file(self, name: str) -> str | None:
        node: Any = self._file
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        if not isinstance(node, str):
            raise errors.ConfigurationError(
                f"secret {name!r} in {self.path} is a {type(node).__name__}, not a string"
            )
        return node

    def get(self, name: str) -> Secret:
        """The secret ``name``; raises `ConfigurationError` saying where to put it."""
        value = self._from_file(name)
        if value is None:
            value = self._env.get(env_name(name, self.env_prefix)) or None
        if value is None:
            where = f" or as `{name}` in {self.path}" if self.path is not None else ""
            raise errors.ConfigurationError(
                f"no secret {name!r}: set ${env_name(name, self.env_prefix)}{where}."
            )
        return Secret(value, name)

    def optional(self, name: str) -> Secret | None:
        try:
            return self.get(name)
        except errors.ConfigurationError:
            return None


def load(
    file: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> Secrets:
    """Secrets from ``file`` (default: ``$FLOWDESK_SECRETS_FILE``, if set) and the
    environment."""
    environ = os.environ if env is None else env
    chosen = file if file is not None else (environ.get(FILE_ENV) or None)
    return Secrets(chosen, env=environ)


def scrub(text: str, secrets: Iterable[Secret]) -> str:
    """``text`` with every secret value in it replaced by ``***``."""
    for secret in secrets:
        value = secret.reveal()
        if value in text:
            text = text.replace(value, MASK)
    return text
