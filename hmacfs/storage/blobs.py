"""Content-addressed blobs for deduplication: one file per distinct content, linked from each path.

Strategy: the upload's sha256 is known when its last byte arrives (it is computed while
streaming), so deduplication costs no second pass: the temp file either becomes the blob
(`link`) or is dropped because the blob is already there. Each path is then a hard link
to the blob, so a download is an ordinary file (sendfile, Range, adoption by another
server all unchanged) and deleting one path never touches another. Where a hard link is
impossible (the blob directory on another filesystem, or the blob at the filesystem's link
limit) the path holds no file and its metadata row points at the blob (`ref`).

Reference counts live in the metadata (`blobs` table). Every change of a count and the
matching change on disk happen inside one metadata write transaction (BEGIN IMMEDIATE,
which also serialises the `hmacfs files` tools in another process), so an upload that
re-uses a blob and a delete that drops its last reference cannot interleave: no blob is
lost and none is orphaned. An upload's count, its placement and its row are one
transaction, so they are never out of step; the janitor reconciles counts with the rows
only after a crash in the middle of one.

A blob is named by its key: the plaintext sha256, with `.enc` appended when the blob holds
AES-GCM segments, so an upload is only ever linked to a blob in its own form (switching
encryption on or off never serves ciphertext as plaintext, nor keeps plaintext behind an
"encrypted" row).

Layout: `<directory>/<key[0:2]>/<key[2:4]>/<key>`.
"""
from __future__ import annotations

import errno
import logging
import os
import re
from typing import Optional

from ..errors import StartupError
from ..meta.record import MetaStore
from .local import _O_CLOEXEC, _O_NOFOLLOW, INTERNAL_DIR, fsync_dir

log = logging.getLogger("hmacfs")
LINK_LIMIT_ERRNOS = (errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ENOTSUP)
KEY = re.compile(r"[0-9a-f]{64}(\.enc)?")


def blob_key(sha256: str, encrypted: bool) -> str:
    """The blob of this content in this form (plain or encrypted)."""
    return sha256 + ".enc" if encrypted else sha256


def is_blob_file(directory: str, dirpath: str, name: str) -> bool:
    """Whether `dirpath/name` is where the blob store itself puts a blob (the janitor removes
    nothing else): a key name, in the two directories its own characters name."""
    if not KEY.fullmatch(name):
        return False
    return os.path.relpath(dirpath, directory) == os.path.join(name[:2], name[2:4])


class BlobStore:
    """Blobs below `directory`, counted in `meta`."""

    def __init__(self, directory: str, meta: MetaStore, storage_root: str) -> None:
        check_directory(directory, storage_root)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.directory = os.path.realpath(directory)
        self.meta = meta
        # Hard links from paths to blobs need one filesystem; otherwise every path is a `ref`.
        self.linkable = os.stat(self.directory).st_dev == os.stat(storage_root).st_dev

    def path_of(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key[2:4], key)

    def acquire(self, temp_path: str, key: str, size: int) -> tuple[str, bool]:
        """Count one more reference to the blob of this content, making it from `temp_path` if it
        is new; returns the blob's path and whether this call made it. The temp file stays (the
        caller drops it). Run it inside the caller's transaction to make the count and the
        caller's row one change."""
        blob = self.path_of(key)
        with self.meta.transaction():
            self.meta.blob_acquire(key, size)
            if os.path.exists(blob):
                return blob, False
            os.makedirs(os.path.dirname(blob), mode=0o700, exist_ok=True)
            try:
                os.link(temp_path, blob)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy(temp_path, blob)
            fsync_dir(os.path.dirname(blob))
        return blob, True

    def discard(self, key: str) -> None:
        """Remove a blob file made by an `acquire` whose transaction is rolling back."""
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            pass

    def release(self, key: str) -> bool:
        """Drop one reference; the blob file goes with the last one. True if it went."""
        with self.meta.transaction():
            if self.meta.blob_release(key) > 0:
                return False
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                log.warning("blob %s was already missing when its last reference went", key)
            return True

    def open(self, key: str) -> Optional[tuple[int, os.stat_result]]:
        """(fd, stat) of a blob, or None when it is missing."""
        try:
            fd = os.open(self.path_of(key), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd)


def _copy(src: str, dst: str) -> None:
    """A durable copy (blob directory on another filesystem): temp name, fsync, rename."""
    tmp = f"{dst}.part"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while True:
            block = fin.read(1024 * 1024)
            if not block:
                break
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)


def check_directory(directory: str, storage_root: str) -> None:
    """A blob directory inside the served tree would let any uploader plant a 'blob' (and serve
    every blob by its hash); one that contains the store would let the janitor's orphan scan
    reach user files. Refused at start: it must be under `.hmacfs/` or outside the store."""
    blob_dir, root = os.path.realpath(directory), os.path.realpath(storage_root)
    internal = os.path.join(root, INTERNAL_DIR)
    inside = blob_dir == root or blob_dir.startswith(root + os.sep)
    if (inside and not blob_dir.startswith(internal + os.sep)) or root.startswith(blob_dir + os.sep):
        raise StartupError(f"[deduplication] directory = {directory!r}: it must be outside the storage path "
                           f"(or below {internal}), and must not contain it")
