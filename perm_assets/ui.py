"""``python -m perm_assets.ui [dg dev options]``: ``dg dev`` (Dagster's webserver, daemon and
code server) that stops on SIGINT and SIGTERM however it was started; ``make ui`` runs it.

A job that a non-interactive shell starts in the background (``make ui &`` in a script, CI
runners) inherits SIGINT ignored. Python then leaves SIGINT ignored, and ``dagster dev`` gives
SIGTERM SIGINT's disposition (``dagster._utils.interrupts.setup_interrupt_handlers``), so
``dg dev`` ignored both: a SIGTERM or Ctrl-C left the webserver, daemon and code server running
(CI saw it; tests/test_ui_stop.py starts ``make ui`` both ways). This resets both signals to
their defaults, which ``exec`` keeps, then becomes ``dg dev``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Exec ``dg dev`` (next to this interpreter) with ``argv`` (default: this command's)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    dg = Path(sys.executable).with_name("dg")
    os.execv(dg, [str(dg), "dev", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
