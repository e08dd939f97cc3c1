"""Facts about the machine a process runs on."""

from __future__ import annotations

from pathlib import Path

__all__ = ["boot_id"]


def boot_id() -> str:
    """This kernel's boot id (Linux: a new one at every boot, shared by every container on the
    machine); empty where the system has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
