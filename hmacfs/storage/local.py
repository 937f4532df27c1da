"""Local filesystem storage: files at `root/<signed path>`, internal state under `root/.hmacfs/`.

Strategy: a file becomes visible only complete. Bytes go to a private temp file under
`.hmacfs/tmp/` (same filesystem), are fsync'd, then hard-linked to the final name:
`link()` fails if the name exists, which gives O_EXCL semantics to racing uploads (one
wins, the rest get 409) without a lock. The directory is fsync'd before success is
reported. The temp name stays until the caller has recorded the metadata, so a failed
metadata write can take the file back (`retract`) and leave nothing. A crash leaves at
worst an orphan temp file, swept at the next start.

Every operation walks the parent directories one component at a time from the root
with `openat(O_NOFOLLOW)` (writes create what is missing there, `mkdirat`) and then acts
on the final name relative to that directory fd, so a symlink planted in the store, even
one swapped in for a directory that was already used, can never make a request read,
write, create or delete anything outside the root, and no status tells whether something
exists outside it. Symlinks inside the store are not followed either. One process owns a
store: `.hmacfs/lock` is held with `flock` for the process lifetime, so a second server on
the same directory refuses to start instead of sweeping the first one's temp files.
Layout is that of prosody-filer, so an existing store directory can be adopted as is.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import secrets
import stat
import threading
from typing import BinaryIO, Optional

from ..errors import HTTPError, StartupError

log = logging.getLogger("hmacfs")
INTERNAL_DIR = ".hmacfs"
PATH_MAX = 4096  # Linux: a longer path is ENAMETOOLONG in any system call
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC


class PathConflict(HTTPError):
    """The name is taken (a file exists, or a parent component is a file): 409."""

    def __init__(self, name: str) -> None:
        super().__init__(409, "a file already exists at this path")
        self.name = name


class OutsideRoot(HTTPError):
    """A path passes through a symlink out of the root (planted by someone with shell access): 403.

    The same answer whether or not anything exists there, so it reveals nothing outside."""

    def __init__(self, name: str) -> None:
        super().__init__(403, "this path leads outside the storage root")
        self.name = name


class LocalStore:
    """Plain files below a root directory."""

    def __init__(self, root: str, lock: bool = True) -> None:
        """`lock=False` is for the management tools, which work beside a running server."""
        try:
            os.makedirs(root, exist_ok=True)
            self.root = os.path.realpath(root)
            self.internal = os.path.join(self.root, INTERNAL_DIR)
            self.tmp_dir = os.path.join(self.internal, "tmp")
            self.versions_dir = os.path.join(self.internal, "versions")
            os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
            self._lock_fd = _lock_store(os.path.join(self.internal, "lock")) if lock else -1
            self._root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as e:
            raise StartupError(f"storage directory {root!r} is not usable: {e.strerror or e}") from None
        # Longest signed path whose full name stays below PATH_MAX (a long root leaves less).
        self.max_path_bytes = PATH_MAX - len(os.fsencode(self.root)) - 2
        self._lock = threading.Lock()
        self._unlink_queue: Optional[queue.SimpleQueue] = None

    def close(self) -> None:
        """Release the store (the lock goes with the process anyway)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- naming ---------------------------------------------------------------------------------

    def full_path(self, signed_path: str) -> str:
        """Where a (validated) signed path lives; never outside the root by construction."""
        return os.path.join(self.root, signed_path)

    # -- writing --------------------------------------------------------------------------------

    def new_temp(self) -> tuple[BinaryIO, str]:
        """A new private temp file (opened for writing, unbuffered) and its path."""
        path = self.temp_name()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        return os.fdopen(fd, "wb", buffering=0), path

    def temp_name(self) -> str:
        """A fresh name in the temp directory (for a hard link; the start-up sweep takes leftovers)."""
        return os.path.join(self.tmp_dir, f"up-{secrets.token_hex(16)}")

    def publish(self, temp_path: str, signed_path: str) -> None:
        """Link the fsync'd temp file at `signed_path` (durably); PathConflict if the name is taken,
        OutsideRoot if a parent is a symlink. The temp name stays: `discard_temp` or `retract` next."""
        *parents, name = signed_path.split("/")
        for _attempt in range(3):
            dir_fd = self._walk(parents)
            try:
                os.link(temp_path, name, dst_dir_fd=dir_fd, follow_symlinks=False)
                os.fsync(dir_fd)
                return
            except FileExistsError:
                raise PathConflict(signed_path) from None
            except FileNotFoundError:
                continue  # a concurrent delete pruned a new parent directory: make it again
            except NotADirectoryError:
                raise PathConflict(signed_path) from None
            finally:
                os.close(dir_fd)
        raise PathConflict(signed_path)

    def replace(self, source_path: str, signed_path: str) -> None:
        """Put `source_path` at `signed_path` whether or not a file is there (versioning): a hard
        link under a private name in the same directory, then an atomic rename over the old name."""
        *parents, name = signed_path.split("/")
        dir_fd = self._walk(parents)
        try:
            staged = f".hmacfs-{secrets.token_hex(8)}"
            os.link(source_path, staged, dst_dir_fd=dir_fd, follow_symlinks=False)
            try:
                os.rename(staged, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                os.unlink(staged, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def retract(self, source_path: str, signed_path: str) -> None:
        """Undo `publish` when what had to follow it failed: unlink the final name if it is still
        the source's inode (the source itself stays)."""
        try:
            dir_fd, name = self._parent(signed_path)
        except (OSError, HTTPError):
            return
        try:
            ours, there = os.stat(source_path), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(name, dir_fd=dir_fd)
                os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def link_out(self, signed_path: str, dest: str) -> None:
        """Hard-link the file at `signed_path` to `dest` (an internal path: a kept version)."""
        dir_fd, name = self._parent(signed_path)
        try:
            os.link(name, dest, src_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)

    def _parent(self, signed_path: str) -> tuple[int, str]:
        """(fd of the existing parent directory, final name), reached without following a symlink;
        FileNotFoundError, PathConflict or OutsideRoot otherwise."""
        *parents, name = signed_path.split("/")
        return self._walk(parents, create=False), name

    def _walk(self, parents: list[str], create: bool = True) -> int:
        """An fd of root/parents..., made where missing (`create`), walking one component at a time
        with O_NOFOLLOW from the root's fd (held open: it stays on the root's inode): a symlink
        anywhere is OutsideRoot, a file where a directory should be is PathConflict, a missing
        one (not `create`) FileNotFoundError. The caller closes the fd."""
        fd, owned = self._root_fd, False
        try:
            for name in parents:
                try:
                    child = _open_dir(fd, name)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    child = _open_dir(fd, name)
                if owned:
                    os.close(fd)
                fd, owned = child, True
            return fd if owned else os.dup(fd)
        except BaseException:
            if owned:
                os.close(fd)
            raise

    def discard_temp(self, temp_path: str, later: bool = False) -> None:
        """Remove a temp file; `later`: in a background thread, for big ones whose unlink frees
        many blocks (a deduplicated 1 GiB upload: its bytes are already in the blob) and would
        otherwise delay the response. A crash before that leaves it to the start-up sweep."""
        if later:
            self._unlinker().put(temp_path)
            return
        unlink_if_present(temp_path)

    def _unlinker(self) -> queue.SimpleQueue:
        with self._lock:
            if self._unlink_queue is None:
                self._unlink_queue = queue.SimpleQueue()
                threading.Thread(target=self._unlink_forever, name="unlinker", daemon=True).start()
            return self._unlink_queue

    def _unlink_forever(self) -> None:
        assert self._unlink_queue is not None
        while True:
            path = self._unlink_queue.get()
            try:
                self.discard_temp(path)
            except OSError as e:  # never let the thread die: the start-up sweep takes what it left
                log.warning("could not remove %s: %s", path, e)

    def sweep_temp(self) -> int:
        """Delete temp files a previous run left behind (after a crash); returns how many."""
        count = 0
        for name in os.listdir(self.tmp_dir):
            if name.startswith(("up-", "trash-")):
                self.discard_temp(os.path.join(self.tmp_dir, name))
                count += 1
        return count

    # -- reading --------------------------------------------------------------------------------

    def exists(self, signed_path: str) -> bool:
        """Whether anything stands at `signed_path`; OutsideRoot when a parent is a symlink (so the
        answer never reveals what exists elsewhere)."""
        try:
            dir_fd, name = self._parent(signed_path)
        except (FileNotFoundError, PathConflict):
            return False
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    def open(self, signed_path: str) -> Optional[tuple[int, os.stat_result]]:
        """(fd, stat) of a regular file at `signed_path`, or None (missing, a directory, or reached
        through a symlink anywhere: every component is opened with O_NOFOLLOW)."""
        try:
            dir_fd, name = self._parent(signed_path)
        except (FileNotFoundError, PathConflict, OutsideRoot):
            return None
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # the final component is a symlink
                return None
            raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not _is_regular(st):
            os.close(fd)
            return None
        return fd, st

    def identity(self, signed_path: str) -> Optional[os.stat_result]:
        """One lstat of the full path: to VALIDATE bytes already read through `open` (the hot
        cache compares device, inode, size and mtime), never to decide what to read. It may
        pass through a symlinked directory; then it names another inode and the cache misses.
        One system call instead of a walk: each one hands the GIL to another thread."""
        try:
            st = os.lstat(self.full_path(signed_path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if _is_regular(st) else None

    def stat(self, signed_path: str) -> Optional[os.stat_result]:
        """Stat of a regular file at `signed_path` (never through a symlink), else None."""
        try:
            dir_fd, name = self._parent(signed_path)
        except (FileNotFoundError, PathConflict, OutsideRoot):
            return None
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(dir_fd)
        return st if _is_regular(st) else None

    # -- deleting -------------------------------------------------------------------------------

    def delete(self, signed_path: str) -> bool:
        """Remove the regular file at `signed_path` and its now-empty parent directories (never
        through a symlink); False if it was not there."""
        trash = self.detach(signed_path)
        if trash is None:
            return False
        self.discard_temp(trash)
        return True

    def detach(self, signed_path: str) -> Optional[str]:
        """Move the regular file at `signed_path` out of the served tree, into a private name below
        `.hmacfs/tmp/` (a rename: instant whatever the size), and prune now-empty parents; the
        caller unlinks the returned name (outside any lock: freeing a big file's blocks takes
        time). None if nothing was there. A crash before the unlink: the start-up sweep."""
        try:
            dir_fd, name = self._parent(signed_path)
        except (FileNotFoundError, PathConflict, OutsideRoot):
            return None
        trash = os.path.join(self.tmp_dir, f"trash-{secrets.token_hex(16)}")
        try:
            if not _is_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
                return None
            os.rename(name, trash, src_dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        finally:
            os.close(dir_fd)
        parents = signed_path.split("/")[:-1]
        for depth in range(len(parents), 0, -1):  # the deepest first; stop at one that is not empty
            try:
                dir_fd = self._walk(parents[:depth - 1], create=False)
            except (OSError, HTTPError):
                break
            try:
                os.rmdir(parents[depth - 1], dir_fd=dir_fd)
            except OSError:
                break
            finally:
                os.close(dir_fd)
        return trash

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


def _open_dir(dir_fd: int, name: str) -> int:
    """openat(name, O_DIRECTORY | O_NOFOLLOW); a symlink is OutsideRoot, a file PathConflict."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            raise OutsideRoot(name) from None
        raise PathConflict(name) from None


def _lock_store(path: str) -> int:
    """Hold `path` locked for the life of the process; StartupError if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"storage directory {os.path.dirname(os.path.dirname(path))!r} is in use by "
                           f"another hmacfs process (pid {holder}): one store, one server") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def unlink_if_present(path: str) -> bool:
    """Remove a file that may already be gone (a crash's leftover, a racing cleanup); True if it
    was there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def fsync_dir(path: str) -> None:
    """Make a rename/link durable (POSIX needs the directory fsync'd too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
