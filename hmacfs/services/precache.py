"""Precaching: warm the metadata and directory entries of the store in the background.

Strategy: after a restart the first download of each file pays for a cold metadata page
and a cold directory lookup. Walking the store once (os.scandir: the dentries and inodes
come into the kernel's caches) and reading the metadata table in path order (its pages
come into SQLite's and the OS page cache) moves that cost to start-up, in a thread that
does not delay listening; `/ready` reports when it is done. It never changes anything.
"""
from __future__ import annotations

import os

from ..meta.sqlite import SqliteMeta
from ..storage.local import INTERNAL_DIR, LocalStore


def precache(store: LocalStore, meta: SqliteMeta) -> int:
    """Walk the store and the metadata once; returns how many files were seen."""
    files = 0
    stack = [store.root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name == INTERNAL_DIR and directory == store.root:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        entry.stat(follow_symlinks=False)
                        files += 1
        except OSError:
            continue
    after = ""
    while True:
        page = meta.select(limit=2000, after=after)
        if not page:
            break
        after = page[-1].path
    return files
