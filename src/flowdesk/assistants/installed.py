"""Which assistants are installed on which `App` (the REST routes look them up here)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowdesk import errors

if TYPE_CHECKING:
    from flowdesk.assistants.approvals import Approvals
    from flowdesk.assistants.invoices import Invoices
    from flowdesk.assistants.support import Support
    from flowdesk.engine.app import App


@dataclass
class Installed:
    approvals: Approvals | None = None
    support: Support | None = None
    invoices: Invoices | None = None


_INSTALLED: weakref.WeakKeyDictionary[App, Installed] = weakref.WeakKeyDictionary()


def of(app: App) -> Installed:
    found = _INSTALLED.get(app)
    if found is None:
        found = _INSTALLED[app] = Installed()
    return found


def approvals(app: App) -> Approvals:
    found = of(app).approvals
    if found is None:
        raise errors.AssistantNotInstalled("approvals")
    return found


def support(app: App) -> Support:
    found = of(app).support
    if found is None:
        raise errors.AssistantNotInstalled("support")
    return found


def invoices(app: App) -> Invoices:
    found = of(app).invoices
    if found is None:
        raise errors.AssistantNotInstalled("invoices")
    return found
