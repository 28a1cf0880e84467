"""A test hook: kill this process at a named point, as a crash would.

When ``$FLOWDESK_TRIGGER_CRASH_AT`` names a point, the process sends itself SIGKILL when it
reaches it: no exception, no cleanup, no ``finally``. The fault tests use it to kill a
consumer after its run is durably started but before the message is acknowledged, and a
file watcher between starting a run and moving the file. Points:

* ``stream:after_start``: a stream consumer started (or found) the run, before the ack;
* ``filedrop:after_claim``: the watcher moved a file into ``processing/``, before the start;
* ``filedrop:after_start``: the watcher started (or found) the run, before any move.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

CRASH_ENV = "FLOWDESK_TRIGGER_CRASH_AT"

log = logging.getLogger("flowdesk.triggers")


def point(name: str) -> None:
    """SIGKILL this process if ``$FLOWDESK_TRIGGER_CRASH_AT`` is ``name``."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: killing process %d", name, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
