"""The bytes of resumable uploads in progress: one append-only file each, in `.hmacfs/partials/`.

Strategy: the file's length is the upload's offset (as in tusd's file store), so an upload
survives kill -9 and restart with nothing else to reconcile: every append is written
through, fsync'd when its request ends, and a chunk that must be discarded (a checksum
mismatch) is truncated away. The directory is inside the store's internal directory, on
the same filesystem, so a finished upload is committed by a hard link, never a copy, and
nothing in it is ever served. Names are the upload ids (192 random bits, base64url).
"""
from __future__ import annotations

import os
import re
import secrets
import time
from typing import Optional

from .local import fsync_dir

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{32}")


def new_upload_id() -> str:
    """192 random bits: the upload resource's URL is its capability."""
    return secrets.token_urlsafe(24)


class PartialFiles:
    """Create, size, append to, truncate and remove the files of unfinished uploads."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def path(self, upload_id: str) -> str:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise ValueError("not an upload id")
        return os.path.join(self.directory, upload_id)

    def create(self, upload_id: str) -> None:
        fd = os.open(self.path(upload_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, 0o600)
        os.close(fd)
        fsync_dir(self.directory)

    def size(self, upload_id: str) -> Optional[int]:
        """Bytes received so far; None when the file is gone."""
        try:
            return os.stat(self.path(upload_id), follow_symlinks=False).st_size
        except FileNotFoundError:
            return None

    def open_at(self, upload_id: str, offset: int) -> int:
        """A write fd positioned at `offset`; anything past it (a crash mid-append that a
        checksum would have discarded) is cut first. FileNotFoundError when gone."""
        fd = os.open(self.path(upload_id), os.O_WRONLY | _O_CLOEXEC | _O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != offset:
                os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, upload_id: str) -> int:
        return os.open(self.path(upload_id), os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)

    def remove(self, upload_id: str) -> bool:
        try:
            os.unlink(self.path(upload_id))
            return True
        except FileNotFoundError:
            return False

    def orphans(self, known: set[str], older_than: float) -> list[str]:
        """Files with no upload row (a crash between creating the file and its row), last
        written more than `older_than` seconds ago."""
        cutoff = time.time() - older_than
        found = []
        for name in os.listdir(self.directory):
            if name in known or not UPLOAD_ID.fullmatch(name):
                continue
            try:
                if os.stat(os.path.join(self.directory, name), follow_symlinks=False).st_mtime < cutoff:
                    found.append(name)
            except FileNotFoundError:
                continue
        return found
