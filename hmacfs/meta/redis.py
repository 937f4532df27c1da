"""Per-file metadata in Redis, shared by every node of a cluster: SqliteMeta's API on Redis.

Strategy: each public write is one Lua script (meta/redis_scripts.py), so a read-then-write
(put_new, take, blob_acquire/release, drop_versions, the usage that follows every row) is
atomic across nodes without a round trip per step. `transaction()` is a cluster-wide write
lock (SET NX PX with a random token, compare-and-delete on release) plus a journal of the
old value of each hash field and sorted-set member it changes; every write script refuses
to run while another node holds the lock, so a transaction is never interleaved with a
write from elsewhere, and rollback restores the journal. Why not MULTI/WATCH: a transaction
spans Python code (blob files, S3 calls) between its writes, which WATCH cannot hold.

- The lock lives LOCK_TTL_MS (15 s) and a thread renews it every 5 s while held. A node that
  dies holding it blocks writers until the TTL ends; the next writer then rolls back the
  journal it left (a crash is a rollback, as in SQLite). A node stalled past the TTL finds
  its lock lost: its next write fails with 503 and writes nothing.
- Readers take no lock: another node may see a transaction's writes before it ends (and see
  them go on rollback). The file on disk or in the bucket stays the truth about existence.
- No row cache (SqliteMeta has one): another node may change any row at any time.
- Redis unreachable, timing out, loading or read-only: HTTPError 503 with Retry-After. A
  write that fails has changed nothing, or everything when only its reply was lost to a
  timeout: a script runs whole or not at all. The client is the caller's; give it
  `socket_timeout` and `socket_connect_timeout` (a hung Redis must cost a request seconds,
  not forever) and `health_check_interval`; redis-py reconnects by itself when Redis returns.
- Keys (all under `prefix`, so one Redis serves several deployments): `file` hash path->JSON;
  `paths` lex ZSET; `exp` ZSET by expiry; `up:<uploader>` lex ZSETs; `img` and
  `img:<image>` lex ZSETs of packed files; `vh:<path>` hash version->JSON; `vloc` hash
  location->count; `usage` hash (F/B total, f:<u>/b:<u>); `bref`/`bsize` hashes, `bidx` lex
  ZSET and `bstat` counters of blobs; `bcount` hash blob->rows naming it; `log:<uploader>`
  ZSET by time (members "seq:size"), `logusers`, `logseq`; `partial` hash + `pexp` ZSET
  (the expiry is the score); `ban` hash + `bans` ZSET by until; `lock`, `journal`.
  Records are JSON without their None fields: floats round-trip exactly (repr).

The redis-py import is guarded: hmacfs without it imports; only RedisMeta() needs it.
"""
from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional

from ..errors import HTTPError, StartupError
from .record import BanRecord, FileRecord, PartialRecord, Usage, VersionRecord
from .redis_scripts import READ, WRITE
from .sqlite import SCHEMA_VERSION, run_undo

try:
    import redis
    import redis.exceptions as _rx
    UNAVAILABLE: tuple[type[BaseException], ...] = (
        _rx.ConnectionError, _rx.TimeoutError, _rx.BusyLoadingError, _rx.ReadOnlyError,
        _rx.TryAgainError, _rx.ClusterDownError, _rx.OutOfMemoryError)
except ImportError:  # pragma: no cover - exercised only without redis-py
    redis = None  # type: ignore[assignment]
    UNAVAILABLE = ()

log = logging.getLogger("hmacfs")
LOCK_TTL_MS = 15_000
RENEW_EVERY = LOCK_TTL_MS / 3000
LOCK_WAIT = 30.0  # seconds a write waits for another node's transaction (SQLite's busy timeout)
FLOATS = {"created", "expires", "file_expires", "until"}
INTS = {"size", "mtime_ns", "version", "image_offset", "length", "failures"}
BOOLS = {"ref", "encrypted", "completed"}


def unavailable() -> HTTPError:
    return HTTPError(503, "shared state (Redis) is unavailable, retry later", {"Retry-After": "5"})


def _shared(method: Callable) -> Callable:
    """Redis away (or busy, or read-only after a failover) becomes a 503 the client retries."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except UNAVAILABLE as e:
            raise unavailable() from e
    return wrapper


def _encode(record: Any) -> str:
    """JSON of a record without its None fields, each value of its column's type (as SQLite's
    affinity would store it: an int `created` comes back a float)."""
    out: dict[str, Any] = {}
    for name, value in asdict(record).items():
        if value is None:
            continue
        out[name] = float(value) if name in FLOATS else int(value) if name in INTS else \
            bool(value) if name in BOOLS else value
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(value: float) -> str:
    return repr(float(value))


class RedisMeta:
    """MetaStore on Redis (cluster mode): same methods and meaning as SqliteMeta."""

    def __init__(self, client: Any, prefix: str = "hmacfs:") -> None:
        if redis is None:
            raise StartupError("[redis] needs the Python package redis (redis-py): pip install redis")
        self.client = client
        self.prefix = prefix
        self._write = client.register_script(WRITE)
        self._read = client.register_script(READ)
        self._local = threading.RLock()  # threads of this process queue here before the Redis lock
        self._token = ""  # the Redis lock's token while this process holds it
        self._depth = 0
        self._undo: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def _key(self, name: str) -> str:
        return self.prefix + name

    def check_schema(self) -> None:
        """Record the row format these nodes write (SCHEMA_VERSION), or refuse one a newer
        hmacfs wrote: its rows may hold fields this version cannot read (a StartupError,
        not a TypeError on the first download)."""
        found = self.client.get(self._key("schema"))
        if found is not None and int(_text(found)) > SCHEMA_VERSION:
            raise StartupError(f"the Redis metadata under {self.prefix!r} was written by a newer hmacfs "
                               f"(schema {_text(found)}; this version reads up to {SCHEMA_VERSION}): upgrade hmacfs")
        if found is None or int(_text(found)) < SCHEMA_VERSION:
            self.client.set(self._key("schema"), SCHEMA_VERSION)

    def close(self) -> None:
        """Stop the lock renewer; the client belongs to whoever made it."""
        self._closed.set()

    # -- the lock, the journal and the write script ------------------------------------------

    def _run(self, op: str, *args: Any) -> Any:
        """One write script; waits (up to LOCK_WAIT) while another node holds the lock."""
        pause, deadline = 0.002, time.monotonic() + LOCK_WAIT
        with self._local:
            while True:
                try:
                    return self._write(args=[self.prefix, self._token, LOCK_TTL_MS, op, *args])
                except redis.exceptions.ResponseError as e:
                    message = str(e)
                    if "HMACFS_LOST" in message:
                        raise HTTPError(503, "shared state lock was lost, retry later", {"Retry-After": "5"}) from e
                    if "HMACFS_DUPLICATE" in message:
                        raise ValueError(f"{op}: the row exists ({args[:2]!r})") from None
                    if "HMACFS_LOCKED" not in message:
                        raise
                self._wait(deadline, pause)
                pause = min(pause * 2, 0.05)

    def _wait(self, deadline: float, pause: float) -> None:
        if time.monotonic() > deadline:
            raise HTTPError(503, "shared state is busy (cluster write lock), retry later", {"Retry-After": "5"})
        time.sleep(pause * (0.5 + random.random()))  # noqa: S311 (jitter, not a secret)

    def _lock_op(self, op: str, token: str) -> int:
        return int(self._write(args=[self.prefix, token, LOCK_TTL_MS, op]))

    @contextmanager
    def transaction(self) -> Iterator[list[Callable[[], None]]]:
        """One write transaction across the cluster; nested calls (same thread) join it.

        Yields a list for undo steps: when the block raises, its writes are rolled back, then
        the steps run newest first while the lock is still held, and the exception goes on."""
        with self._local:
            if self._depth:
                self._depth += 1
                try:
                    yield self._undo
                finally:
                    self._depth -= 1
                return
            token = uuid.uuid4().hex
            pause, deadline = 0.002, time.monotonic() + LOCK_WAIT
            try:
                while not self._lock_op("acquire", token):
                    self._wait(deadline, pause)
                    pause = min(pause * 2, 0.05)
            except UNAVAILABLE as e:
                raise unavailable() from e
            self._token, self._depth, self._undo = token, 1, []
            undo = self._undo
            self._start_renewer()
            try:
                yield undo
            except BaseException:
                try:
                    if not self._lock_op("rollback", token):
                        log.error("metadata transaction: the Redis lock expired before the rollback; "
                                  "the next writer rolls its journal back")
                except UNAVAILABLE:
                    log.error("metadata transaction: Redis went away; its journal is rolled back "
                              "when the lock expires")
                run_undo(undo)
                self._end(token)
                raise
            else:
                self._end(token, commit=True)
            finally:
                self._token, self._depth, self._undo = "", 0, []

    def _end(self, token: str, commit: bool = False) -> None:
        """Release the lock (dropping the journal: what stands now is committed)."""
        try:
            if not self._lock_op("commit", token) and commit:
                raise HTTPError(503, "shared state lock was lost, retry later", {"Retry-After": "5"})
        except UNAVAILABLE as e:
            if commit:
                raise unavailable() from e
            log.error("metadata transaction: Redis went away before the lock was released")

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew, name="hmacfs-redis-lock", daemon=True)
            self._renewer.start()

    def _renew(self) -> None:
        """Keep a long transaction's lock (blob copies, S3 calls inside it) from expiring."""
        while not self._closed.wait(RENEW_EVERY):
            token = self._token
            if token:
                try:
                    self._lock_op("renew", token)
                except Exception:
                    log.warning("metadata transaction: could not renew the Redis lock", exc_info=True)

    # -- reads -------------------------------------------------------------------------------

    def _rows(self, rows: str, index: str, kind: str, lo: Any, hi: Any, limit: int) -> list[tuple[str, str, Any]]:
        """(id, score, JSON or None) through an index, one snapshot."""
        out = self._read(args=[self._key(rows), self._key(index), kind, lo, hi, limit])
        return [(_text(out[i]), _text(out[i + 1]), out[i + 2]) for i in range(0, len(out), 3)]

    def _files(self, index: str, after: str, limit: int, prefix: str = "",
               keep: Callable[[FileRecord], bool] = lambda r: True) -> list[FileRecord]:
        """Rows by path after `after` through a lex index, `limit` of those `keep` accepts."""
        lo, hi, found = ("(" + after) if after >= prefix else ("[" + prefix), "+", []
        if prefix:
            hi = b"(" + prefix.encode() + b"\xff"  # above every UTF-8 string starting with prefix
        while limit < 0 or len(found) < limit:
            batch = self._rows("file", index, "lex", lo, hi, max(limit, 100))
            for _, _, raw in batch:
                record = raw and _file(raw)
                if record and keep(record) and (limit < 0 or len(found) < limit):
                    found.append(record)
            if len(batch) < max(limit, 100):
                break
            lo = "(" + batch[-1][0]
        return found

    def get(self, path: str) -> Optional[FileRecord]:
        raw = self.client.hget(self._key("file"), path)
        return _file(raw) if raw else None

    def fresh(self, path: str) -> Optional[FileRecord]:
        """The row as Redis has it now (RedisMeta keeps no cache: the same as get)."""
        return self.get(path)

    def expired(self, now: float, limit: int = 1000) -> list[FileRecord]:
        rows = self._rows("file", "exp", "score", "-inf", _num(now), limit)
        return [_file(raw) for _, _, raw in rows if raw]

    def select(self, uploader: Optional[str] = None, prefix: Optional[str] = None,
               created_before: Optional[float] = None, limit: int = 1000, after: str = "") -> list[FileRecord]:
        """Rows matching every given selector, by path, `limit` at a time after the path `after`."""
        index = "paths" if uploader is None else "up:" + uploader
        return self._files(index, after, limit, prefix or "", lambda r: (
            (uploader is None or r.uploader == uploader) and (created_before is None or r.created < created_before)))

    def packed(self, image: Optional[str] = None, after: str = "", limit: int = 1000) -> list[FileRecord]:
        """Rows of files packed into ISO images (of `image` only, when given), by path."""
        index = "img" if image is None else "img:" + image
        return self._files(index, after, limit, keep=lambda r: r.image is not None and image in (None, r.image))

    # -- writes ------------------------------------------------------------------------------

    def put(self, record: FileRecord) -> None:
        """Insert or replace the row of `record.path`."""
        self._run("put", "put", _encode(record))

    def put_new(self, record: FileRecord) -> bool:
        """Insert the row unless the path has one; False when it has (a racing upload won)."""
        return bool(self._run("put", "new", _encode(record)))

    def take(self, path: str, expired_at: Optional[float] = None) -> Optional[FileRecord]:
        """Delete the row of `path` and return it as it was; with `expired_at`, only a row
        that is still expired then (a fresh upload in its place is left alone)."""
        raw = self._run("take", path, "" if expired_at is None else _num(expired_at))
        return _file(raw) if raw else None

    # -- blobs (deduplication) ---------------------------------------------------------------

    def blob_acquire(self, sha256: str, size: int) -> int:
        """One more reference to a blob (made at 1); returns the count after."""
        return int(self._run("blob_acquire", sha256, int(size)))

    def blob_release(self, sha256: str) -> int:
        """One reference less; the blob goes at 0. Returns the count after (0: unreferenced)."""
        return int(self._run("blob_release", sha256))

    def blob_refs(self, sha256: str) -> int:
        return int(self.client.hget(self._key("bref"), sha256) or 0)

    def blob_counted_refs(self, sha256: str) -> int:
        """Files and versions naming the blob (kept by the scripts; the janitor reconciles)."""
        return int(self.client.hget(self._key("bcount"), sha256) or 0)

    def set_blob_refs(self, sha256: str, size: int, refs: int) -> None:
        self._run("set_blob_refs", sha256, int(size), int(refs))

    def blob_page(self, after: str = "", limit: int = 500) -> list[tuple[str, int, int]]:
        shas = [_text(s) for s in self.client.zrangebylex(self._key("bidx"), "(" + after, "+", 0, limit)]
        if not shas:
            return []
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(self._key("bsize"), shas)
        pipe.hmget(self._key("bref"), shas)
        sizes, refs = pipe.execute()
        return [(s, int(z), int(r)) for s, z, r in zip(shas, sizes, refs) if z is not None and r is not None]

    def blob_stats(self) -> tuple[int, int, int]:
        """(blobs, bytes held in blobs, logical bytes that reference them)."""
        n, size, logical = self.client.hmget(self._key("bstat"), ["n", "bytes", "logical"])
        return int(n or 0), int(size or 0), int(logical or 0)

    # -- versions ----------------------------------------------------------------------------

    def versions(self, path: str) -> list[VersionRecord]:
        """Kept older versions of `path`, oldest first."""
        rows = self.client.hvals(self._key("vh:" + path))
        return sorted((VersionRecord(**json.loads(raw)) for raw in rows), key=lambda v: v.version)

    def version_file_known(self, location: str) -> bool:
        """Does a version row name this file below the versions directory?"""
        return bool(self.client.hexists(self._key("vloc"), location))

    def add_version(self, version: VersionRecord) -> None:
        """Keep an older version; ValueError when (path, version) exists (SQLite: IntegrityError)."""
        self._run("add_version", version.path, int(version.version), _encode(version))

    def drop_versions(self, path: str, keep: int) -> list[VersionRecord]:
        """Remove all but the newest `keep` versions of `path`; returns the removed ones."""
        return [VersionRecord(**json.loads(raw)) for raw in self._run("drop_versions", path, int(keep))]

    # -- quotas ------------------------------------------------------------------------------

    def usage(self, uploader: str) -> Usage:
        files, size = self.client.hmget(self._key("usage"), ["f:" + uploader, "b:" + uploader])
        return Usage(uploader, int(files or 0), int(size or 0))

    def _all_usage(self) -> list[Usage]:
        raw = {_text(k): int(v) for k, v in self.client.hgetall(self._key("usage")).items()}
        return [Usage(k[2:], n, raw.get("b:" + k[2:], 0)) for k, n in raw.items() if k.startswith("f:") and n > 0]

    def all_usage(self) -> list[Usage]:
        return sorted(self._all_usage(), key=lambda u: (-u.bytes, u.uploader))

    def uploader_count(self) -> int:
        return len(self._all_usage())

    def total_bytes(self) -> int:
        return int(self.client.hget(self._key("usage"), "B") or 0)

    def total_files(self) -> int:
        return int(self.client.hget(self._key("usage"), "F") or 0)

    def bytes_since(self, uploader: str, since: float) -> int:
        members = self.client.zrangebyscore(self._key("log:" + uploader), _num(since), "+inf")
        return sum(int(_text(m).rsplit(":", 1)[1]) for m in members)

    def log_upload(self, uploader: str, at: float, size: int) -> None:
        self._run("log_upload", uploader, _num(at), int(size))

    def prune_upload_log(self, before: float) -> None:
        self._run("prune_upload_log", _num(before))

    # -- resumable uploads in progress -------------------------------------------------------

    def partial_put(self, record: PartialRecord) -> None:
        """Insert or replace the row of one resumable upload."""
        self._run("partial_put", record.id, _num(record.expires), _encode(record))

    def partial_touch(self, upload_id: str, expires: float) -> None:
        """Move an upload's expiry on (no row is made if it was removed meanwhile)."""
        self._run("partial_touch", upload_id, _num(expires))

    def partial_get(self, upload_id: str) -> Optional[PartialRecord]:
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self._key("partial"), upload_id)
        pipe.zscore(self._key("pexp"), upload_id)
        raw, expires = pipe.execute()
        return _partial(raw, expires) if raw and expires is not None else None

    def partial_delete(self, upload_id: str) -> bool:
        return bool(self._run("partial_delete", upload_id))

    def partials_expired(self, now: float, limit: int = 1000) -> list[PartialRecord]:
        rows = self._rows("partial", "pexp", "score", "-inf", _num(now), limit)
        return [_partial(raw, score) for _, score, raw in rows if raw]

    def partial_ids(self) -> set[str]:
        return {_text(i) for i in self.client.zrange(self._key("pexp"), 0, -1)}

    # -- bans --------------------------------------------------------------------------------

    def ban_put(self, ban: BanRecord) -> None:
        """Insert or replace the ban of `ban.address` (a renewed ban moves its end)."""
        self._run("ban_put", ban.address, _num(ban.until), _encode(ban))

    def ban_get(self, address: str) -> Optional[BanRecord]:
        raw = self.client.hget(self._key("ban"), address)
        return BanRecord(**json.loads(raw)) if raw else None

    def ban_remove(self, address: str) -> bool:
        return bool(self._run("ban_remove", address))

    def bans_active(self, now: float) -> list[BanRecord]:
        """Bans still in force at `now`, the longest-running first."""
        rows = self._rows("ban", "bans", "score", "(" + _num(now), "+inf", -1)
        return sorted((BanRecord(**json.loads(raw)) for _, _, raw in rows if raw),
                      key=lambda b: (-b.until, b.address))

    def bans_purge(self, now: float) -> int:
        """Remove bans that ended by `now`; returns how many."""
        return int(self._run("bans_purge", _num(now)))


def _file(raw: Any) -> FileRecord:
    return FileRecord(**json.loads(raw))


def _partial(raw: Any, expires: Any) -> PartialRecord:
    fields = json.loads(raw)
    fields["expires"] = float(expires)
    return PartialRecord(**fields)


for _name, _value in list(vars(RedisMeta).items()):  # every public method: Redis away -> 503
    if callable(_value) and not _name.startswith("_") and _name not in ("transaction", "close"):
        setattr(RedisMeta, _name, _shared(_value))
