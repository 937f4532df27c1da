"""The small-file cache: identity-checked hits, bounded size."""
from __future__ import annotations

from hmacfs.services.hotcache import HotFiles, Identity


def test_hit_requires_same_identity() -> None:
    hot = HotFiles()
    ident = Identity(7, 1, 3, 100)
    hot.put("a/b", ident, b"abc")
    assert hot.get("a/b", ident) == b"abc"
    assert hot.get("a/b", Identity(8, 1, 3, 100)) is None   # same inode number on another device: a miss
    hot.put("a/b", ident, b"abc")
    assert hot.get("a/b", Identity(7, 1, 3, 101)) is None   # touched since: dropped
    assert hot.get("a/b", ident) is None


def test_bounds() -> None:
    hot = HotFiles(max_file=4, max_total=8)
    hot.put("big", Identity(7, 1, 5, 0), b"12345")
    assert hot.get("big", Identity(7, 1, 5, 0)) is None      # over max_file: never cached
    hot.put("short", Identity(7, 1, 9, 0), b"123")
    assert hot.get("short", Identity(7, 1, 9, 0)) is None    # size disagrees with identity
    for i in range(3):
        hot.put(f"f{i}", Identity(7, i, 4, 0), b"abcd")
    assert hot.get("f0", Identity(7, 0, 4, 0)) is None       # evicted: total stays <= 8 bytes
    assert hot.get("f2", Identity(7, 2, 4, 0)) == b"abcd"
    hot.discard("f2")
    assert hot.get("f2", Identity(7, 2, 4, 0)) is None
