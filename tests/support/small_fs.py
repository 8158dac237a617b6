"""A real small filesystem for disk-full tests: a tmpfs the test mounts (root only)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_filesystem(where: Path, size_mib: int) -> Iterator[Path]:
    """Mount a ``size_mib`` tmpfs at ``where``; skip the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        # Lazy: a process the test killed may still hold a file open for a moment.
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file until the filesystem refuses another byte; return it."""
    path = directory / name
    chunk = b"\0" * 65536
    with path.open("ab", buffering=0) as out:
        for size in (65536, 4096, 512, 1):  # big steps first, then the last crumbs
            for _ in range(1_000_000):
                try:
                    out.write(chunk[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return path


def free(path: Path) -> None:
    os.unlink(path)
