"""Small real filesystems for tests: a size-limited tmpfs, remounted read-only on demand.

Strategy: disk-full and read-only behaviour can only be shown on a filesystem that is
really full or really read-only; a tmpfs of a few MiB is both cheap and exact (it
allocates in pages and answers ENOSPC / EROFS like any disk). Mounting needs root (or
CAP_SYS_ADMIN); where it is refused, `MountRefused` carries the reason so the caller can
skip with it. The mount is always taken down again, lazily (`umount -l`) if a process
still holds it.
"""
from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]
TIMEOUT = 10


class MountRefused(Exception):
    """Mounting was refused (not root, no CAP_SYS_ADMIN in a container) or `mount` is missing."""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _why(done: subprocess.CompletedProcess) -> str:
    """The tool's complaint on one line (mount's stderr runs over two)."""
    return " ".join((done.stderr or done.stdout).split()) or f"{done.args[0]} exited {done.returncode}"


def _need(program: str) -> None:
    if shutil.which(program) is None:
        raise MountRefused(f"{program} is not on PATH")


@contextmanager
def tmpfs(path: PathLike, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "8m") at `path` (made if missing); always unmounted after."""
    _need("mount")
    _need("umount")
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target))
    if done.returncode != 0:
        raise MountRefused(_why(done))
    try:
        yield target
    finally:
        unmount(target)


def unmount(path: PathLike) -> None:
    """umount, or detach lazily when something still uses the mount; never raises."""
    if _run("umount", str(path)).returncode != 0:
        _run("umount", "-l", str(path))


def remount_ro(path: PathLike) -> None:
    """Make a mounted filesystem read-only in place (its files stay, writes get EROFS)."""
    done = _run("mount", "-o", "remount,ro", str(path))
    if done.returncode != 0:
        raise MountRefused(_why(done))
