"""Live processes as /proc shows them, for tests that check what a command started or left running."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def proc_files(*names: str) -> Iterator[tuple[int, dict[str, bytes]]]:
    """(pid, {name: bytes of /proc/<pid>/<name>}) for every live process whose files could all be read."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            files = {name: Path(f"/proc/{pid}/{name}").read_bytes() for name in names}
        except OSError:  # gone meanwhile, or not ours to read
            continue
        yield int(pid), files


def command_line(files: dict[str, bytes]) -> str:
    """The `cmdline` of `proc_files` as one string."""
    return files["cmdline"].replace(b"\0", b" ").decode(errors="replace")
