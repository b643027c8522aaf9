"""A snapshot of what ``git status`` reports for a checkout, to tell whether a run changed it.

``conftest.py`` takes one before the first test and one after the last and fails the run if
they differ, so no test, benchmark quick mode or notebook execution writes into the tree.
"""

import hashlib
import subprocess
from pathlib import Path


def snapshot(root: Path) -> dict[str, str] | None:
    """``{path: status and content hash}`` of every changed or untracked file under ``root``.

    The hash catches a file that was already modified before the run and is rewritten by it.
    ``None`` when ``root`` is not a git checkout (an sdist, an unpacked archive) or git is
    missing.
    """
    try:
        proc = subprocess.run(
            ["git", "status", "--porcelain", "-z", "--untracked-files=all"],
            cwd=root,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    state = {}
    entries = proc.stdout.decode("utf-8", "surrogateescape").split("\0")
    for entry in entries:
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        file = root / path
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else "-"
        state[path] = f"{status} {digest}"
    return state


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The paths whose status or content differ between two snapshots, sorted."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
