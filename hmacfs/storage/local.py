"""Local filesystem storage: files at `root/<signed path>`, internal state under `root/.hmacfs/`.

Strategy: a file becomes visible only complete. Bytes go to a private temp file under
`.hmacfs/tmp/` (same filesystem), are fsync'd, then hard-linked to the final name:
`link()` fails if the name exists, which gives O_EXCL semantics to racing uploads (one
wins, the rest get 409) without a lock. The directory is fsync'd before success is
reported. A crash leaves at worst an orphan temp file, swept at the next start.
Layout is that of prosody-filer, so an existing store directory can be adopted as is.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from typing import BinaryIO, Optional

INTERNAL_DIR = ".hmacfs"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class PathConflict(Exception):
    """The name is taken (a file exists, or a parent component is a file)."""


class OutsideRoot(Exception):
    """A path resolved outside the storage root (a symlink placed by someone with shell access)."""


class LocalStore:
    """Plain files below a root directory."""

    def __init__(self, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.internal = os.path.join(self.root, INTERNAL_DIR)
        self.tmp_dir = os.path.join(self.internal, "tmp")
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        self._safe_dirs: set[str] = set()
        self._lock = threading.Lock()

    # -- naming ---------------------------------------------------------------------------------

    def full_path(self, signed_path: str) -> str:
        """Where a (validated) signed path lives; never outside the root by construction."""
        return os.path.join(self.root, signed_path)

    def _check_dir_inside(self, directory: str) -> None:
        """Refuse a parent directory that resolves outside the root (symlinked elsewhere)."""
        if directory in self._safe_dirs:
            return
        real = os.path.realpath(directory)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise OutsideRoot(directory)
        if real.startswith(self.internal + os.sep) or real == self.internal:
            raise OutsideRoot(directory)
        with self._lock:
            if len(self._safe_dirs) > 10000:
                self._safe_dirs.clear()
            self._safe_dirs.add(directory)

    # -- writing --------------------------------------------------------------------------------

    def new_temp(self) -> tuple[BinaryIO, str]:
        """A new private temp file (opened for writing, unbuffered) and its path."""
        path = os.path.join(self.tmp_dir, f"up-{secrets.token_hex(16)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        return os.fdopen(fd, "wb", buffering=0), path

    def commit(self, temp_path: str, signed_path: str) -> None:
        """Make the fsync'd temp file visible at `signed_path`; PathConflict if the name is taken."""
        final = self.full_path(signed_path)
        parent = os.path.dirname(final)
        for _attempt in range(3):
            try:
                os.makedirs(parent, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise PathConflict(signed_path) from None
            self._check_dir_inside(parent)
            try:
                os.link(temp_path, final, follow_symlinks=False)
                break
            except FileExistsError:
                raise PathConflict(signed_path) from None
            except FileNotFoundError:
                continue  # a concurrent delete pruned the new parent directory: make it again
            except NotADirectoryError:
                raise PathConflict(signed_path) from None
        else:
            raise PathConflict(signed_path)
        fsync_dir(parent)
        os.unlink(temp_path)

    def discard_temp(self, temp_path: str) -> None:
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass

    def sweep_temp(self) -> int:
        """Delete temp files a previous run left behind (after a crash); returns how many."""
        count = 0
        for name in os.listdir(self.tmp_dir):
            if name.startswith("up-"):
                self.discard_temp(os.path.join(self.tmp_dir, name))
                count += 1
        return count

    # -- reading --------------------------------------------------------------------------------

    def exists(self, signed_path: str) -> bool:
        try:
            os.lstat(self.full_path(signed_path))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False

    def open(self, signed_path: str) -> Optional[tuple[int, os.stat_result]]:
        """(fd, stat) of a regular file at `signed_path`, or None (missing, directory, symlink)."""
        final = self.full_path(signed_path)
        try:
            self._check_dir_inside(os.path.dirname(final))
            fd = os.open(final, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, OutsideRoot):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # the final component is a symlink
                return None
            raise
        st = os.fstat(fd)
        if not _is_regular(st):
            os.close(fd)
            return None
        return fd, st

    def stat(self, signed_path: str) -> Optional[os.stat_result]:
        """lstat of a regular file at `signed_path` (not through a symlink), else None."""
        final = self.full_path(signed_path)
        try:
            self._check_dir_inside(os.path.dirname(final))
            st = os.lstat(final)
        except (FileNotFoundError, NotADirectoryError, OutsideRoot):
            return None
        return st if _is_regular(st) else None

    # -- deleting -------------------------------------------------------------------------------

    def delete(self, signed_path: str) -> bool:
        """Remove the file and now-empty parent directories; False if it was not there."""
        final = self.full_path(signed_path)
        try:
            self._check_dir_inside(os.path.dirname(final))
            if self.stat(signed_path) is None:
                return False
            os.unlink(final)
        except (FileNotFoundError, NotADirectoryError, OutsideRoot):
            return False
        parent = os.path.dirname(final)
        while parent != self.root and parent.startswith(self.root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                break
            with self._lock:
                self._safe_dirs.discard(parent)
            parent = os.path.dirname(parent)
        return True

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def fsync_dir(path: str) -> None:
    """Make a rename/link durable (POSIX needs the directory fsync'd too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
