"""Store management for the command line: list, delete, usage, reindex and rekey.

Why this module exists: operators need to act on a store (free space, remove one
uploader's files, adopt a prosody-filer directory, retire an encryption key) while the
server keeps running. So these functions go through exactly what the server uses: the
same metadata database (SQLite in WAL mode, write transactions with BEGIN IMMEDIATE, which
serialise with the server's across processes), the same `Catalog.remove` (a file goes with
its versions and blob references, and a blob file with its last reference) and the same
rules for rebuilding a row from a file. They never take the store's lock (that belongs to
the one server) and never write a file in place: a changed file is a new file renamed over
the old name, so a reader (or a crash) sees the old bytes or the new ones, never a mix.

The functions are plain (no printing); `cli.py` formats what they return.
"""
from __future__ import annotations

import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence
from urllib.parse import quote

from .catalog import Catalog
from .config import Config
from .errors import HTTPError
from .meta import FileRecord, SqliteMeta
from .pipeline import rebuilt_record, record_for_file, record_matches
from .policy.paths import decode_segment
from .storage.blobs import BlobStore
from .storage.encrypted import plaintext_digest
from .storage.local import INTERNAL_DIR, LocalStore, fsync_dir, unlink_if_present

if TYPE_CHECKING:
    from .storage.encrypted import Keyring

PAGE = 1000
MAGIC = b"HMFSAEAD"  # storage/encrypted.py's magic, repeated so that listing never needs libcrypto
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UsageError(ValueError):
    """The request itself is wrong (no selector, a bad path): the command line's exit 2."""


@dataclass
class Tools:
    """One store opened for management, beside (not instead of) a running server."""

    config: Config
    store: LocalStore
    meta: Any  # SqliteMeta, or RedisMeta in cluster mode
    blobs: Optional[BlobStore]
    catalog: Catalog
    keyring: Optional[Keyring] = None
    objects: Optional[Any] = None  # the S3 backend's ObjectStore

    def close(self) -> None:
        self.meta.close()
        self.store.close()


def open_store(config: Config, keys: bool = True) -> Tools:
    """The store of `config` without its lock. StartupError when it cannot be opened (unusable
    directory, a database from a newer hmacfs, an unreadable keyfile). `keys=False` skips the
    keyfile for commands that never read file contents."""
    store = LocalStore(config.server.storagepath, lock=False)
    meta: Any
    if config.redis.redisenabled:  # cluster mode: the shared metadata, as every node sees it
        from .app import connect_redis
        from .meta.redis import RedisMeta

        meta = RedisMeta(connect_redis(config), config.redis.rediskeyprefix)
    else:
        meta = SqliteMeta(os.path.join(store.internal, "meta.sqlite3"), cache=False)
    try:
        blobs, objects, object_blobs = None, None, None
        if config.storage.backend == "s3":
            from .app import build_object_store
            from .storage.objects import ObjectBlobs

            objects = build_object_store(config)
            object_blobs = ObjectBlobs(objects, meta)  # releases blobs of rows written with dedup on
        elif config.deduplication.enabled:
            blobs = BlobStore(blob_directory(config, store), meta, store.root)
        keyring = None
        if keys and config.encryption.enabled:
            from .app import load_keyring

            keyring = load_keyring(config)
    except BaseException:
        meta.close()
        raise
    return Tools(config, store, meta, blobs,
                 Catalog(store, meta, blobs, objects=objects, object_blobs=object_blobs), keyring, objects)


def local_only(tools: Tools, verb: str) -> None:
    """Verbs that read the files on this machine's disk have nothing to work on in a bucket."""
    if tools.objects is not None:
        raise UsageError(f"{verb} works on local storage; with backend = \"s3\" the files are in the bucket")


def blob_directory(config: Config, store: LocalStore) -> str:
    return os.path.realpath(config.deduplication.directory or os.path.join(store.internal, "blobs"))


# -- listing and deleting ----------------------------------------------------------------------------

def list_files(tools: Tools, uploader: Optional[str] = None, prefix: Optional[str] = None,
               older_than_seconds: Optional[float] = None, now: Optional[float] = None) -> Iterator[FileRecord]:
    """Rows matching every given selector, by path, read a page at a time (memory stays flat)."""
    created_before = None
    if older_than_seconds is not None:
        created_before = (time.time() if now is None else now) - older_than_seconds
    after = ""
    while True:
        page = tools.meta.select(uploader, prefix or None, created_before, PAGE, after)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].path


def check_path(path: str) -> str:
    """A signed path as given on the command line (a leading '/' is dropped); UsageError unless it
    names something hmacfs could have stored (no '..', no dot names, no control characters)."""
    cleaned = path.lstrip("/")
    if not cleaned or not servable(cleaned):
        raise UsageError(f"not a stored file's path: {path!r}")
    return cleaned


def servable(path: str) -> bool:
    """Whether the server accepts `path` as a signed path (the same segment rules as requests)."""
    try:
        path.encode("utf-8")
        for segment in path.split("/"):
            decode_segment(quote(segment, safe="").encode("ascii"))
    except (UnicodeEncodeError, HTTPError):
        return False
    return True


def delete_files(tools: Tools, uploader: Optional[str] = None, prefix: Optional[str] = None,
                 older_than_seconds: Optional[float] = None, paths: Sequence[str] = (), dry_run: bool = False,
                 now: Optional[float] = None, missing: Optional[list[str]] = None,
                 unselected: Optional[list[str]] = None) -> list[str]:
    """Remove the selected files (versions and blob references included, through `Catalog.remove`);
    returns their paths. Selectors combine (all must match). Explicit `paths` are removed when they
    exist (else they go to `missing`) and match the selectors given with them (else they go to
    `unselected`: a file without a metadata row matches none). With no selector and no path at
    all: UsageError, nothing is touched. `dry_run` only reports."""
    if uploader is None and not prefix and older_than_seconds is None and not paths:
        raise UsageError("refusing to delete without a selector: give --uploader, --prefix, --older-than or paths")
    now = time.time() if now is None else now
    done: list[str] = []
    if paths:
        filtered = uploader is not None or bool(prefix) or older_than_seconds is not None
        for given in paths:
            path = check_path(given)
            record = tools.meta.get(path)
            if record is None and tools.store.stat(path) is None and not tools.meta.versions(path):
                if missing is not None:
                    missing.append(path)
            elif filtered and (record is None or not _selected(record, uploader, prefix, older_than_seconds, now)):
                if unselected is not None:
                    unselected.append(path)
            else:
                if not dry_run:
                    tools.catalog.remove(path)
                done.append(path)
        return done
    for record in list_files(tools, uploader, prefix, older_than_seconds, now):
        if not dry_run:
            tools.catalog.remove(record.path)  # the row goes even when its file was already gone
        done.append(record.path)
    return done


def _selected(record: FileRecord, uploader: Optional[str], prefix: Optional[str],
              older_than_seconds: Optional[float], now: float) -> bool:
    return ((uploader is None or record.uploader == uploader)
            and (not prefix or record.path.startswith(prefix))
            and (older_than_seconds is None or record.created < now - older_than_seconds))


# -- usage ----------------------------------------------------------------------------------------

def usage(tools: Tools) -> dict:
    """Files and bytes per uploader and in all (current files and kept versions, plaintext sizes),
    and what the store really takes on disk: every file below it once per inode (a deduplicated
    blob and the paths that hard-link it count once), kept versions and blobs included, the
    metadata database and temp files not."""
    meta = tools.meta
    uploaders = [{"uploader": u.uploader, "files": u.files, "bytes": u.bytes} for u in meta.all_usage()]
    files, logical = meta.total_files(), meta.total_bytes()
    blobs, blob_bytes, referenced = meta.blob_stats()
    physical, inodes = physical_usage(tools) if tools.objects is None else bucket_usage(tools.objects)
    return {
        "uploaders": uploaders,
        "unattributed": {"files": files - sum(u["files"] for u in uploaders),
                         "bytes": logical - sum(u["bytes"] for u in uploaders)},
        "total": {"files": files, "logical_bytes": logical, "physical_bytes": physical, "inodes": inodes,
                  "blobs": blobs, "blob_bytes": blob_bytes, "dedup_saved_bytes": max(0, referenced - blob_bytes)},
    }


def bucket_usage(objects: Any) -> tuple[int, int]:
    """(bytes, objects) of the files, versions and blobs in the bucket (one listing)."""
    from .storage.objects import BLOB_PREFIX, OBJECT_PREFIX

    total = count = 0
    for info in objects.client.list_objects(objects.prefix):
        if info.key[len(objects.prefix):].startswith((OBJECT_PREFIX, BLOB_PREFIX)):
            total += info.size
            count += 1
    return total, count


def physical_usage(tools: Tools) -> tuple[int, int]:
    """(bytes, inodes) of the regular files in the store tree, the versions and the blobs."""
    seen: set[tuple[int, int]] = set()
    total = 0
    tops = [(tools.store.root, True), (tools.store.versions_dir, False),
            (blob_directory(tools.config, tools.store), False)]
    for top, is_tree in tops:
        for _rel, _full, st in _walk(top, skip_internal=is_tree, skip_dots=False):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_size
    return total, len(seen)


def _walk(top: str, skip_internal: bool, skip_dots: bool,
          skip_dirs: frozenset[str] = frozenset()) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path with '/', full path, lstat) of every regular file below `top`, symlinks not
    followed. `skip_internal`: `top` is a store root, leave its `.hmacfs` out; `skip_dots`: leave
    out every name starting with a dot (not servable: staging names, hidden files)."""
    stack = [("", top)]
    while stack:
        rel_dir, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if (skip_dots and name.startswith(".")) or (skip_internal and not rel_dir and name == INTERNAL_DIR):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.path not in skip_dirs:
                    subdirs.append((rel, entry.path))
            elif stat.S_ISREG(st.st_mode):
                yield rel, entry.path, st
        stack.extend(reversed(subdirs))  # visited in name order


def _store_files(tools: Tools) -> Iterator[tuple[str, str, os.stat_result]]:
    """The files the server could serve: the tree without `.hmacfs`, dot names and a blob
    directory configured inside the tree."""
    blob_dir = blob_directory(tools.config, tools.store)
    return _walk(tools.store.root, skip_internal=True, skip_dots=True, skip_dirs=frozenset({blob_dir}))


# -- reindex --------------------------------------------------------------------------------------

@dataclass
class ReindexReport:
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def reindex(tools: Tools) -> ReindexReport:
    """Metadata for the files already in the store that have no row, or a stale one (changed
    outside hmacfs): sha256 and size of the content, type by extension, created = the file's
    mtime. Encrypted files are decrypted to hash their plaintext (skipped, and reported, without
    a keyfile); with a keyfile, a plaintext row over a file that decrypts (a download recorded
    the ciphertext of a file that had lost its row) is rebuilt too. Files are only ever read."""
    report = ReindexReport()
    for rel, full, st in _store_files(tools):
        report.scanned += 1
        if not servable(rel):
            report.skipped += 1
            report.problems.append(f"{show(rel)}: skipped: not a name the server can serve")
            continue
        record = tools.meta.get(rel)
        recheck = False  # a matching plaintext row, looked at again only if the file is encrypted
        if record is not None and (record.ref or record_matches(record, st)):
            if record.ref or record.encrypted or tools.keyring is None:
                report.unchanged += 1
                continue
            recheck = True
        try:
            fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except OSError as e:
            report.skipped += 1
            report.problems.append(f"{show(rel)}: skipped: {e.strerror or e}")
            continue
        try:
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode):
                report.skipped += 1
                continue
            encrypted = os.pread(fd, len(MAGIC), 0) == MAGIC
            if recheck and not encrypted:
                report.unchanged += 1
                continue
            if encrypted:
                problem = _index_encrypted(tools, rel, record, fd, opened)
                if problem and recheck:  # plaintext that merely starts like an encrypted file
                    report.unchanged += 1
                    continue
                if problem:
                    report.skipped += 1
                    report.problems.append(f"{show(rel)}: skipped: {problem}")
                    continue
            else:
                record_for_file(tools.meta, rel, record, fd, opened)
        finally:
            os.close(fd)
        if record is None:
            report.added += 1
        else:
            report.updated += 1
    return report


def _index_encrypted(tools: Tools, rel: str, record: Optional[FileRecord], fd: int,
                     st: os.stat_result) -> Optional[str]:
    """Record an encrypted file from its decrypted content; the reason it cannot be, or None."""
    if tools.keyring is None:
        return "the file is encrypted and [encryption] is not configured"
    from .storage.encrypted import EncryptedFileError

    try:
        size, sha256 = plaintext_digest(fd, tools.keyring, st.st_size)
    except EncryptedFileError as e:
        return f"cannot decrypt it: {e}"
    rebuilt = rebuilt_record(rel, record, st, size, sha256, encrypted=True)
    if record is None:
        tools.meta.put_new(rebuilt)  # a row the server wrote meanwhile wins
    else:
        tools.meta.put(rebuilt)
    return None


# -- rekey ----------------------------------------------------------------------------------------

@dataclass
class RekeyReport:
    encrypted: int = 0     # encrypted files (inodes) found: current files, versions, blobs
    current: int = 0       # already under the current key
    rekeyed: int = 0       # re-encrypted under the current key (dry run: would be)
    relinked: int = 0      # linked back to their blob, already re-encrypted by an interrupted run
    names: int = 0         # names renamed over (a blob and the paths hard-linking it are one file)
    rows: int = 0          # metadata rows whose mtime_ns followed the new file
    repaired: int = 0      # rows left stale by an interrupted run, set right
    failed: int = 0        # files that could not be rekeyed (unknown key, damaged, changed meanwhile)
    remaining: int = 0     # files still under another key when the run ended (a rerun takes them)
    problems: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # names rekeyed (dry run: to rekey), store-relative

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Name:
    full: str
    kind: str                   # "blob", "version" or "file"
    signed_path: Optional[str]  # for "file": the path its metadata row is under


@dataclass
class _Inode:
    dev_ino: tuple[int, int]
    key_id: str
    names: list[_Name]


def read_key_id(fd: int) -> Optional[str]:
    """The key id in an encrypted file's header; None for a file that does not start with the magic.
    CorruptFile when it does but the header is malformed."""
    from .storage.encrypted import HEADER_SIZE, parse_header

    head = os.pread(fd, HEADER_SIZE, 0)
    if head[:len(MAGIC)] != MAGIC:
        return None
    return parse_header(head).key_id


def rekey(tools: Tools, dry_run: bool = False) -> RekeyReport:
    """Re-encrypt every encrypted file (current files, kept versions, blobs) whose header names
    another key than the keyfile's current one, so the old key can be removed afterwards.

    Crash-safe and idempotent: the new copy is written to a temp file, fsync'd, then renamed
    over each name of the old file (a blob first, then every path and version hard-linking it,
    so deduplicated files stay one inode); each file is readable at all times under the old
    key or the new one. The rows of current files (matched to their encrypted file by mtime)
    are updated in the same metadata transaction as the renames; rows left stale by a crash
    are set right on the next run after checking the content's hash."""
    ring = tools.keyring
    if ring is None:
        raise UsageError("rekey needs [encryption] enabled = true and its keyfile")
    report = RekeyReport()
    inodes = _scan_encrypted(tools, ring.current_id, report, repair=not dry_run)
    for entry in inodes.values():
        _rekey_inode(tools, ring, entry, dry_run, report)
    if inodes and not dry_run:  # a path may have linked an old blob meanwhile: say so, a rerun takes it
        report.remaining = len(_scan_encrypted(tools, ring.current_id, RekeyReport(), repair=False))
        if report.remaining:
            report.problems.append(f"{report.remaining} file(s) are still under an older key (failed above, or "
                                   "written or linked while this ran): run rekey again")
    return report


def _scan_encrypted(tools: Tools, current_key: str, report: RekeyReport, repair: bool) -> dict[tuple[int, int], _Inode]:
    """The encrypted files under another key than `current_key`, with all their names (blobs first);
    counts the others in `report` and, with `repair`, sets their stale rows right."""
    from .storage.encrypted import EncryptedFileError

    ring = tools.keyring
    assert ring is not None
    inodes: dict[tuple[int, int], _Inode] = {}
    current: set[tuple[int, int]] = set()
    blob_dir = blob_directory(tools.config, tools.store)
    sources = [("blob", _walk(blob_dir, skip_internal=False, skip_dots=True)),
               ("version", _walk(tools.store.versions_dir, skip_internal=False, skip_dots=True)),
               ("file", _store_files(tools))]
    for kind, files in sources:
        for rel, full, st in files:
            try:
                key_id = _key_id_of(full)
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (OSError, EncryptedFileError) as e:
                report.failed += 1
                report.problems.append(f"{show(_display(tools, full))}: not readable as an encrypted file: {e}")
                continue
            if key_id is None:
                continue
            dev_ino = (st.st_dev, st.st_ino)
            if key_id == current_key:  # nothing to do but count it (and check its row)
                if dev_ino not in current:
                    current.add(dev_ino)
                    report.encrypted += 1
                    report.current += 1
                if kind == "file" and repair:
                    _repair_row(tools, ring, rel, full, st, report)
                continue
            entry = inodes.get(dev_ino)
            if entry is None:
                entry = inodes[dev_ino] = _Inode(dev_ino, key_id, [])
                report.encrypted += 1
            entry.names.append(_Name(full, kind, rel if kind == "file" else None))
    return inodes


def _key_id_of(full: str) -> Optional[str]:
    fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    try:
        return read_key_id(fd)
    finally:
        os.close(fd)


def _display(tools: Tools, full: str) -> str:
    """A name as shown to the operator: relative to the store root when inside it."""
    root = tools.store.root + os.sep
    return full[len(root):] if full.startswith(root) else full


def _rekey_inode(tools: Tools, ring: Keyring, entry: _Inode, dry_run: bool, report: RekeyReport) -> None:
    from .storage.encrypted import EncryptedFileError

    shown = [_display(tools, n.full) for n in entry.names]
    if entry.key_id not in ring:
        report.failed += 1
        report.problems.append(f"{show(shown[0])}: encrypted under key {entry.key_id!r}, which is not in the "
                               "keyfile: it cannot be re-encrypted (keep that key until it is restored or deleted)")
        return
    if dry_run:
        report.rekeyed += 1
        report.names += len(entry.names)
        report.paths.extend(shown)
        return
    source = _rekeyed_blob(tools, entry, ring.current_id)
    temp = None
    try:
        if source is None:
            try:
                temp = _reencrypt(tools, ring, entry)
            except (OSError, EncryptedFileError) as e:
                report.failed += 1
                report.problems.append(f"{show(shown[0])}: not re-encrypted: {e}")
                return
            if temp is None:
                report.failed += 1
                report.problems.append(f"{show(shown[0])}: changed while being rekeyed; run rekey again")
                return
        try:
            replaced = _swap_in(tools, temp or source, entry, report)
        except OSError as e:
            report.failed += 1
            report.problems.append(f"{show(shown[0])}: not rekeyed: {e}")
            return
    finally:
        if temp is not None:
            unlink_if_present(temp)
    if replaced:
        if temp is None:
            report.relinked += 1
        else:
            report.rekeyed += 1
        report.paths.extend(_display(tools, n.full) for n in replaced)


def _rekeyed_blob(tools: Tools, entry: _Inode, current_key: str) -> Optional[str]:
    """After a run stopped between a blob and the paths linking it, the blob is already under the
    current key: the paths are linked to it again instead of being re-encrypted on their own."""
    from .storage.encrypted import EncryptedFileError

    if tools.blobs is None or any(n.kind == "blob" for n in entry.names):
        return None
    for name in entry.names:
        if name.kind != "file" or name.signed_path is None:
            continue
        record = tools.meta.get(name.signed_path)
        if record is None or not record.blob or not record.encrypted:
            continue
        blob = tools.blobs.path_of(record.blob)
        try:
            st = os.stat(blob)
            if _key_id_of(blob) == current_key and (st.st_dev, st.st_ino) != entry.dev_ino:
                return blob
        except (OSError, EncryptedFileError):
            continue
    return None


def _reencrypt(tools: Tools, ring: Keyring, entry: _Inode) -> Optional[str]:
    """The content of `entry` under the current key in a new fsync'd temp file (same segment size,
    mode and, where permitted, owner), on the same filesystem as its names; None if no name of it
    is left (deleted or replaced meanwhile)."""
    from .storage.encrypted import SegmentReader, SegmentWriter

    for name in entry.names:
        try:
            fd = os.open(name.full, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != entry.dev_ino:
                continue
            reader = SegmentReader(fd, ring, st.st_size)
            temp = _temp_beside(tools, name.full, st)
            try:
                out_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, st.st_mode & 0o777)
                with os.fdopen(out_fd, "wb", buffering=0) as out:
                    if os.geteuid() == 0:
                        try:
                            os.fchown(out.fileno(), st.st_uid, st.st_gid)
                        except OSError:
                            pass
                    writer = SegmentWriter(out, ring, reader.segment_size)
                    if reader.plaintext_size:
                        for piece in reader.iter_range(0, reader.plaintext_size - 1):
                            writer.write(piece)
                    else:
                        reader.verify_all()
                    writer.finish()
                    os.fsync(out.fileno())
            except BaseException:
                unlink_if_present(temp)
                raise
            return temp
        finally:
            os.close(fd)
    return None


def _temp_beside(tools: Tools, name: str, st: os.stat_result) -> str:
    """A temp file name in `.hmacfs/tmp`, or beside `name` when that is another filesystem (a blob
    directory elsewhere), so the result can be hard-linked to every name of the file."""
    directory = tools.store.tmp_dir
    if os.stat(directory).st_dev != st.st_dev:
        directory = os.path.dirname(name)
        return os.path.join(directory, f".hmacfs-rekey-{secrets.token_hex(16)}")
    return os.path.join(directory, f"rekey-{secrets.token_hex(16)}")


def _swap_in(tools: Tools, source: str, entry: _Inode, report: RekeyReport) -> list[_Name]:
    """Rename `source` over every name of `entry` that still is that file (blobs first), and move the
    rows of current files to the new mtime, in one metadata transaction."""
    replaced: list[_Name] = []
    ordered = sorted(entry.names, key=lambda n: {"blob": 0, "version": 1}.get(n.kind, 2))
    with tools.meta.transaction():
        new_mtime = os.stat(source).st_mtime_ns
        for name in ordered:
            try:
                st = os.lstat(name.full)
            except FileNotFoundError:
                continue  # deleted meanwhile: nothing to keep readable
            if (st.st_dev, st.st_ino) != entry.dev_ino:
                report.failed += 1
                report.problems.append(f"{show(_display(tools, name.full))}: replaced while being rekeyed; "
                                       "run rekey again")
                continue
            _rename_over(source, name.full)
            replaced.append(name)
            report.names += 1
        for name in replaced:
            if name.kind != "file" or name.signed_path is None:
                continue
            record = tools.meta.get(name.signed_path)
            if record is not None and record.encrypted and not record.ref:
                tools.meta.put(replace(record, mtime_ns=new_mtime))
                report.rows += 1
    return replaced


def _rename_over(source: str, dest: str) -> None:
    """Hard-link `source` under a private name beside `dest`, rename it over `dest`, fsync the directory."""
    directory = os.path.dirname(dest)
    staged = os.path.join(directory, f".hmacfs-{secrets.token_hex(8)}")
    os.link(source, staged)
    try:
        os.rename(staged, dest)
    except BaseException:
        os.unlink(staged)
        raise
    fsync_dir(directory)


def _repair_row(tools: Tools, ring: Keyring, rel: str, full: str, st: os.stat_result, report: RekeyReport) -> None:
    """A current-key file whose row has another mtime (a run stopped between its renames and the
    row update): if the plaintext still hashes to the row's sha256, the row takes the file's mtime."""
    from .storage.encrypted import EncryptedFileError

    record = tools.meta.get(rel)
    if record is None or not record.encrypted or record.ref or record.mtime_ns == st.st_mtime_ns:
        return
    try:
        fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        opened = os.fstat(fd)
        size, sha256 = plaintext_digest(fd, ring, opened.st_size)
    except EncryptedFileError:
        return  # not this row's file (or damaged): reindex or a download will say so
    finally:
        os.close(fd)
    if (size, sha256) != (record.size, record.sha256):
        return
    with tools.meta.transaction():
        if tools.meta.get(rel) == record and os.lstat(full).st_ino == opened.st_ino:
            tools.meta.put(replace(record, mtime_ns=opened.st_mtime_ns))
            report.repaired += 1


# -- display ----------------------------------------------------------------------------------------

def show(text: str) -> str:
    """`text` safe for a terminal: controls and undecodable bytes as escapes, backslashes doubled."""
    out = []
    for c in text:
        code = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def iso(ts: Optional[float]) -> Optional[str]:
    """ISO-8601 UTC to the second, or None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def record_json(record: FileRecord) -> dict:
    """A row as `files list --json` prints it."""
    return {"path": record.path, "size": record.size, "content_type": record.content_type,
            "sha256": record.sha256, "uploader": record.uploader, "created": iso(record.created),
            "expires": iso(record.expires), "version": record.version, "encrypted": record.encrypted,
            "deduplicated": record.blob is not None}
