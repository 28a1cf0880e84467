from __future__ import annotations

from flowdesk.cli import main

main()
