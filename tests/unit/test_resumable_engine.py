"""The resumable-upload engine (hmacfs/resumable.py) over real files, SQLite and sockets.

Why: tus and the IETF draft are thin translations over this engine, so its promises are the
protocols' promises: the partial file tells the offset; every byte that arrives is kept
unless a checksum was asked for (then a chunk is kept whole and verified, or not at all); the
running sha256 kept in memory always matches the bytes on disk (also after a 460, a cut-off
append, a full disk or a restart), because the last byte commits with that digest and no
second pass; a failed commit leaves the partial whole for a retry; the sweep removes what
expired or a crash left, never an upload being written; and a newcomer takes over from a
request stuck on a dead connection within moments, not after its read timeout.
The engine is built the way hmacfs/app.py builds it, in a temp dir; the `engine` fixture runs
each test with plain partial files and with sealed ones (encryption at rest on).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
import socket
import threading
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import pytest

from hmacfs.errors import HTTPError
from hmacfs.http.body import BodyTruncated, ChunkedBody, LengthBody
from hmacfs.meta import FileRecord, SqliteMeta
from hmacfs.meta.record import PartialRecord
from hmacfs.pipeline import SPACE_CHECK_BYTES, PathLocks, Upload, UploadPipeline
from hmacfs.resumable import ORPHAN_AGE, STALE_AFTER, Attachment, ResumableUploads, UploadBusy, Writers
from hmacfs.storage.aesgcm import CryptoUnavailable
from hmacfs.storage.blobs import BlobStore
from hmacfs.storage.encrypted import Keyring, SegmentReader
from hmacfs.storage.local import LocalStore
from hmacfs.storage.partials import MAGIC, SEALED, UPLOAD_ID, PartialCorrupt, PartialFiles, new_upload_id

NOW = 1_700_000_000.0
EXPIRY = 3600.0
PATH = "slot123/file.bin"
DATA = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, not a multiple of any buffer size below


def keyring() -> Keyring:
    ring = Keyring([("k1", bytes(range(32)))])
    try:
        ring.cipher("k1")
    except CryptoUnavailable as e:
        pytest.skip(f"no usable libcrypto: {e}")
    return ring


# --- the engine, as hmacfs/app.py builds it --------------------------------------------------------

@dataclass
class Engine:
    root: Path
    store: LocalStore
    meta: SqliteMeta
    pipeline: UploadPipeline
    files: PartialFiles
    uploads: ResumableUploads
    keyring: Optional[Keyring]

    def close(self) -> None:
        self.meta.close()
        self.store.close()


def build(root: Path, keep_versions: Optional[int] = None, writers: Optional[Writers] = None,
          dedup: bool = False, ring: Optional[Keyring] = None, meta_dir: Optional[Path] = None) -> Engine:
    store = LocalStore(str(root))
    meta = SqliteMeta(os.path.join(str(meta_dir) if meta_dir else store.internal, "meta.sqlite3"))
    blobs = BlobStore(os.path.join(store.internal, "blobs"), meta, store.root) if dedup else None
    pipeline = UploadPipeline(store, meta, blobs, keep_versions, ring, locks=PathLocks())
    files = PartialFiles(os.path.join(store.internal, "partials"), ring)
    uploads = ResumableUploads(files, meta, pipeline, store, EXPIRY, writers or Writers(wait=2.0))
    return Engine(root, store, meta, pipeline, files, uploads, ring)


@pytest.fixture(params=["plain", "sealed"])
def engine(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    e = build(tmp_path / "store", ring=keyring() if request.param == "sealed" else None)
    yield e
    e.close()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Engine]:
    e = build(tmp_path / "store")
    yield e
    e.close()


class Pieces:
    """A request body arriving in the given pieces (each read returns at most one piece), then
    ending, or raising `fail` where the connection broke."""

    def __init__(self, pieces: list[bytes], fail: Optional[BaseException] = None) -> None:
        self.pieces = [p for p in pieces if p]
        self.index = 0
        self.fail = fail
        self.received = 0

    def readinto(self, buf: memoryview) -> int:
        if self.index == len(self.pieces):
            if self.fail is not None:
                raise self.fail
            return 0
        piece = self.pieces[self.index]
        n = min(len(buf), len(piece))
        buf[:n] = piece[:n]
        if n == len(piece):
            self.index += 1
        else:
            self.pieces[self.index] = piece[n:]
        self.received += n
        return n


def create(e: Engine, length: int = len(DATA), now: float = NOW, path: str = PATH) -> PartialRecord:
    return e.uploads.create(path, length, "application/x-test", "tus", "v", now)


def append(e: Engine, upload_id: str, pieces: list[bytes], checksum: Optional[tuple[str, bytes]] = None,
           now: float = NOW, fail: Optional[BaseException] = None, reserve: int = 0, bufsize: int = 4096) -> int:
    """One append request: find, take the writer's turn, append."""
    record = e.uploads.find(upload_id, now)
    with e.uploads.writing(record, None, now) as (record, attachment):
        return e.uploads.append(record, attachment, Pieces(pieces, fail), memoryview(bytearray(bufsize)), now,
                                checksum, reserve)


def finish(e: Engine, upload_id: str, now: float = NOW) -> FileRecord:
    record = e.uploads.find(upload_id, now)
    with e.uploads.writing(record, None, now) as (record, attachment):
        return e.uploads.finish(record, attachment, Upload(record.path, record.content_type),
                                memoryview(bytearray(64 * 1024)), now)


def attachment_of(e: Engine, upload_id: str) -> Attachment:
    with e.uploads.writers.hold(upload_id, None) as attachment:
        return attachment


def held(e: Engine, upload_id: str) -> bytes:
    """The plaintext the partial file holds (authenticated when sealed)."""
    size = e.files.size(upload_id)
    assert size is not None
    return b"".join(e.files.read(upload_id, size))


def committed(e: Engine, path: str = PATH) -> bytes:
    """The plaintext of the committed file (decrypted when stored encrypted)."""
    if e.keyring is None:
        return Path(e.store.full_path(path)).read_bytes()
    fd = os.open(e.store.full_path(path), os.O_RDONLY)
    try:
        reader = SegmentReader(fd, e.keyring)
        if reader.plaintext_size == 0:
            return b""
        return b"".join(bytes(p) for p in reader.iter_range(0, reader.plaintext_size - 1))
    finally:
        os.close(fd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_covers(e: Engine, attachment, n: int) -> bool:
    """The running sha256 covers exactly [0, n) of DATA: with plain partials, which the commit
    hard-links and does not re-read. Sealed ones are re-read and encrypted by the commit, which
    hashes them then: no running hash is kept for them (it would be read back for nothing)."""
    if e.keyring is not None:
        return not hasattr(attachment.digest, "hexdigest")
    return attachment.digest_at == n and attachment.digest.hexdigest() == sha(DATA[:n])


def digest_of(algorithm: str, data: bytes) -> bytes:
    return hashlib.new(algorithm, data).digest()


def status_of(excinfo: pytest.ExceptionInfo) -> int:
    assert isinstance(excinfo.value, HTTPError), excinfo.value
    return excinfo.value.status


# --- the happy path ------------------------------------------------------------------------------

def test_create_append_in_pieces_finish(engine: Engine) -> None:
    """The offset is the partial file's length after each append; the last byte commits a file
    with the right bytes, sha256 and record, and the upload is then kept as completed."""
    record = create(engine)
    assert engine.uploads.offset(record) == 0 and engine.files.size(record.id) == 0
    offset = 0
    for part in (DATA[:1000], DATA[1000:1001], DATA[1001:7000], DATA[7000:]):
        offset = append(engine, record.id, [part[:333], part[333:]], bufsize=1000)
        assert offset == engine.files.size(record.id) == engine.uploads.offset(engine.uploads.find(record.id, NOW))
        assert held(engine, record.id) == DATA[:offset]
    assert offset == len(DATA)
    stored = finish(engine, record.id)
    assert (stored.path, stored.size, stored.sha256, stored.content_type) == (PATH, len(DATA), sha(DATA),
                                                                              "application/x-test")
    assert committed(engine) == DATA
    assert engine.meta.get(PATH) == stored
    done = engine.uploads.find(record.id, NOW)
    assert done.completed and engine.uploads.offset(done) == len(DATA)
    assert engine.files.size(record.id) is None  # the partial file went with the commit
    assert os.listdir(engine.store.tmp_dir) == []  # and so did the commit's temp link


def test_an_empty_upload_commits_an_empty_file(engine: Engine) -> None:
    """Upload-Length: 0 is whole at creation: finish commits b'' with the sha256 of nothing."""
    record = create(engine, 0)
    stored = finish(engine, record.id)
    assert stored.size == 0 and stored.sha256 == sha(b"")
    assert committed(engine) == b""


def test_finish_before_the_last_byte_is_400(engine: Engine) -> None:
    """Nothing is committed from an incomplete upload."""
    record = create(engine)
    append(engine, record.id, [DATA[:10]])
    with pytest.raises(HTTPError) as e:
        finish(engine, record.id)
    assert status_of(e) == 400
    assert not engine.store.exists(PATH) and engine.meta.get(PATH) is None
    assert engine.files.size(record.id) == 10


def test_running_digest_follows_every_append(engine: Engine) -> None:
    """The in-memory sha256 covers exactly [0, offset): what finish commits without re-reading."""
    record = create(engine)
    append(engine, record.id, [DATA[:5000]])
    attachment = attachment_of(engine, record.id)
    assert digest_covers(engine, attachment, 5000)


def test_an_append_moves_the_expiry_on(engine: Engine) -> None:
    """Expiry counts from the last append: an upload in use does not expire."""
    record = create(engine)
    assert record.expires == NOW + EXPIRY
    append(engine, record.id, [DATA[:10]], now=NOW + 100)
    assert engine.meta.partial_get(record.id).expires == NOW + 100 + EXPIRY


def test_an_empty_append_changes_nothing(engine: Engine) -> None:
    """No bytes: same offset, and the expiry does not move (nothing was written)."""
    record = create(engine)
    assert append(engine, record.id, [], now=NOW + 100) == 0
    assert engine.meta.partial_get(record.id).expires == NOW + EXPIRY


# --- checksums -----------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_append_with_a_matching_checksum_keeps_the_bytes(engine: Engine, algorithm: str) -> None:
    record = create(engine)
    part = DATA[:3000]
    assert append(engine, record.id, [part[:100], part[100:]], (algorithm, digest_of(algorithm, part))) == 3000
    assert held(engine, record.id) == part


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_a_wrong_checksum_is_460_and_changes_nothing(engine: Engine, algorithm: str) -> None:
    """A mismatch discards the chunk: the offset, the file and the running digest are as before
    it, so the next append and the commit still give the right sha256."""
    record = create(engine)
    append(engine, record.id, [DATA[:1000]])
    wrong = digest_of(algorithm, b"something else")
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [DATA[1000:3000]], (algorithm, wrong), now=NOW + 50)
    assert status_of(e) == 460
    assert engine.files.size(record.id) == 1000 and held(engine, record.id) == DATA[:1000]
    attachment = attachment_of(engine, record.id)
    assert digest_covers(engine, attachment, 1000)
    assert engine.meta.partial_get(record.id).expires == NOW + EXPIRY  # nothing kept: no sign of life
    assert append(engine, record.id, [DATA[1000:]]) == len(DATA)
    assert finish(engine, record.id).sha256 == sha(DATA)


def test_a_wrong_checksum_on_the_first_append_leaves_an_empty_upload(engine: Engine) -> None:
    record = create(engine)
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [DATA], ("sha256", digest_of("sha256", DATA[:-1])))
    assert status_of(e) == 460 and engine.files.size(record.id) == 0
    assert append(engine, record.id, [DATA], ("sha256", digest_of("sha256", DATA))) == len(DATA)
    assert finish(engine, record.id).sha256 == sha(DATA)


# --- appends cut off midway ----------------------------------------------------------------------

def test_a_cut_off_append_keeps_what_arrived(engine: Engine) -> None:
    """Without a checksum every byte that arrived stays (the phone resumes from there)."""
    record = create(engine)
    with pytest.raises(BodyTruncated):
        append(engine, record.id, [DATA[:700], DATA[700:1500]], fail=BodyTruncated(1500, str(len(DATA))),
               now=NOW + 10)
    assert engine.files.size(record.id) == 1500 and held(engine, record.id) == DATA[:1500]
    assert engine.meta.partial_get(record.id).expires == NOW + 10 + EXPIRY  # bytes kept: alive
    attachment = attachment_of(engine, record.id)
    assert digest_covers(engine, attachment, 1500)
    assert append(engine, record.id, [DATA[1500:]]) == len(DATA)
    assert finish(engine, record.id).sha256 == sha(DATA)


def test_a_cut_off_append_with_a_checksum_keeps_nothing(engine: Engine) -> None:
    """With a checksum the chunk can only be kept whole and verified: a cut discards it."""
    record = create(engine)
    append(engine, record.id, [DATA[:100]])
    with pytest.raises(BodyTruncated):
        append(engine, record.id, [DATA[100:700], DATA[700:1500]], ("sha1", digest_of("sha1", DATA[100:2000])),
               fail=BodyTruncated(1400, "1900"))
    assert engine.files.size(record.id) == 100 and held(engine, record.id) == DATA[:100]
    attachment = attachment_of(engine, record.id)
    assert digest_covers(engine, attachment, 100)
    append(engine, record.id, [DATA[100:]])
    assert finish(engine, record.id).sha256 == sha(DATA)


def test_a_body_failing_with_enospc_is_507_and_keeps_what_was_written(engine: Engine) -> None:
    """A full disk is the client's 507, not a 500; the bytes already on disk stay consistent."""
    record = create(engine)
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [DATA[:900]], fail=OSError(errno.ENOSPC, "No space left on device"))
    assert status_of(e) == 507 and engine.files.size(record.id) == 900
    append(engine, record.id, [DATA[900:]])
    assert finish(engine, record.id).sha256 == sha(DATA)


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_really_full_disk_is_507_and_leaves_a_consistent_upload(tmp_path: Path, sealed: bool) -> None:
    """On a real 2 MiB tmpfs filled up: the append's writes (plain) or the sealing of what it
    gathered (sealed) hit ENOSPC. The client gets 507, the upload's offset is what is really on
    disk, and once there is room again the same upload completes with the right hash."""
    from tests.support.mounts import MountRefused, tmpfs

    data = os.urandom(600_000)
    with contextlib.ExitStack() as stack:
        try:
            mount = stack.enter_context(tmpfs(tmp_path / "small", "2m"))
        except MountRefused as err:
            pytest.skip(f"mounting a tmpfs was refused: {err}")
        # the metadata elsewhere: here only the bytes run out (else SQLite's own 507 hides how
        # the append itself copes)
        e = build(mount / "store", ring=keyring() if sealed else None, meta_dir=tmp_path)
        stack.callback(e.meta.close)
        record = create(e, len(data))
        filler = mount / "filler"
        stats = os.statvfs(mount)
        with open(filler, "wb") as f:  # leave about 200 KB
            f.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - 200_000))
        with pytest.raises(HTTPError) as excinfo:
            append(e, record.id, [data[i:i + 50_000] for i in range(0, len(data), 50_000)], bufsize=50_000)
        assert status_of(excinfo) == 507
        offset = e.uploads.offset(e.uploads.find(record.id, NOW))
        assert offset < len(data)
        assert held(e, record.id) == data[:offset]  # what the offset promises is what is there
        filler.unlink()
        append(e, record.id, [data[offset:]])
        assert finish(e, record.id).sha256 == sha(data) and committed(e) == data


def test_free_space_is_checked_as_an_append_grows(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past each MiB the engine checks that the rest of the upload still fits above `reserve`:
    507 then, keeping (and hashing) exactly the bytes written."""
    length = 3 * SPACE_CHECK_BYTES
    data = os.urandom(length)
    record = create(engine, length)
    monkeypatch.setattr(engine.store, "free_bytes", lambda: 0)
    piece = 256 * 1024
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [data[i:i + piece] for i in range(0, 2 * SPACE_CHECK_BYTES, piece)],
               reserve=1, bufsize=piece)
    assert status_of(e) == 507 and engine.files.size(record.id) == SPACE_CHECK_BYTES
    monkeypatch.undo()
    append(engine, record.id, [data[SPACE_CHECK_BYTES:]], bufsize=piece)
    assert finish(engine, record.id).sha256 == sha(data)


# --- the upload's length -------------------------------------------------------------------------

def test_one_read_past_the_length_is_413_and_writes_nothing(engine: Engine) -> None:
    record = create(engine, 10)
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [b"x" * 11])
    assert status_of(e) == 413 and engine.files.size(record.id) == 0


def test_bytes_before_the_one_past_the_length_are_kept(engine: Engine) -> None:
    """Reads that fit stay (no checksum); the read that would pass the length is refused whole."""
    record = create(engine, 10)
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [b"a" * 6, b"b" * 6])
    assert status_of(e) == 413 and held(engine, record.id) == b"a" * 6
    append(engine, record.id, [b"c" * 4])
    assert finish(engine, record.id).sha256 == sha(b"a" * 6 + b"c" * 4)


def test_past_the_length_with_a_checksum_keeps_nothing(engine: Engine) -> None:
    record = create(engine, 10)
    with pytest.raises(HTTPError) as e:
        append(engine, record.id, [b"a" * 6, b"b" * 6], ("md5", digest_of("md5", b"a" * 6 + b"b" * 6)))
    assert status_of(e) == 413 and engine.files.size(record.id) == 0


def test_an_append_exactly_to_the_length_is_fine(engine: Engine) -> None:
    record = create(engine, 10)
    assert append(engine, record.id, [b"a" * 9, b"b"]) == 10


# --- restart -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
@pytest.mark.parametrize("before_restart", [0, 1, 4097, len(DATA)])
def test_finish_after_a_restart_rebuilds_the_digest(tmp_path: Path, before_restart: int, sealed: bool) -> None:
    """A new engine over the same directories (kill -9 and restart) has no digest in memory: it
    is rebuilt from the partial file once, and the commit still gets the right sha256."""
    ring = keyring() if sealed else None
    first = build(tmp_path / "store", ring=ring)
    record = create(first)
    append(first, record.id, [DATA[:before_restart]])
    first.close()
    second = build(tmp_path / "store", ring=ring)
    try:
        assert attachment_of(second, record.id).digest is None
        found = second.uploads.find(record.id, NOW)
        assert found == replace(record, expires=found.expires) and second.uploads.offset(found) == before_restart
        append(second, record.id, [DATA[before_restart:]])
        stored = finish(second, record.id)
        assert stored.sha256 == sha(DATA) and committed(second) == DATA
    finally:
        second.close()


def test_a_digest_from_another_offset_is_not_trusted(engine: Engine) -> None:
    """A cached digest for a different offset (bytes written by another node, or a stale state)
    is ignored and the digest rebuilt from the file."""
    record = create(engine)
    append(engine, record.id, [DATA[:2000]])
    attachment = attachment_of(engine, record.id)
    attachment.digest, attachment.digest_at = hashlib.sha256(b"bogus"), 1999
    append(engine, record.id, [DATA[2000:]])
    assert finish(engine, record.id).sha256 == sha(DATA)


# --- a commit that fails -------------------------------------------------------------------------

def test_a_409_commit_leaves_the_partial_whole_for_a_retry(engine: Engine) -> None:
    """With versioning off a file at the path is a 409; the upload stays whole (offset == length,
    same bytes, not completed), no temp link is left, and after the file goes a retry commits."""
    record = create(engine)
    append(engine, record.id, [DATA])
    taken = Path(engine.store.full_path(PATH))
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's file")
    with pytest.raises(HTTPError) as e:
        finish(engine, record.id)
    assert status_of(e) == 409
    assert taken.read_bytes() == b"someone else's file"
    found = engine.uploads.find(record.id, NOW)
    assert not found.completed and engine.uploads.offset(found) == len(DATA)
    assert held(engine, record.id) == DATA
    assert os.listdir(engine.store.tmp_dir) == []
    taken.unlink()
    stored = finish(engine, record.id)
    assert stored.sha256 == sha(DATA) and committed(engine) == DATA
    assert engine.uploads.find(record.id, NOW).completed


def test_with_versioning_the_commit_replaces_and_keeps_the_old_file(tmp_path: Path) -> None:
    e = build(tmp_path / "store", keep_versions=3)
    try:
        first = create(e, 3)
        append(e, first.id, [b"old"])
        finish(e, first.id)
        second = create(e)
        append(e, second.id, [DATA])
        stored = finish(e, second.id)
        assert stored.version == 2 and stored.sha256 == sha(DATA)
        assert committed(e) == DATA
        assert [v.sha256 for v in e.meta.versions(PATH)] == [sha(b"old")]
    finally:
        e.close()


def test_with_deduplication_two_uploads_share_one_blob(tmp_path: Path) -> None:
    """The hard-linked partial goes through the same dedup commit as a PUT."""
    e = build(tmp_path / "store", dedup=True)
    try:
        for path in ("a1/x.bin", "b2/y.bin"):
            record = create(e, path=path)
            append(e, record.id, [DATA])
            stored = finish(e, record.id)
            assert stored.blob is not None and stored.sha256 == sha(DATA)
            assert committed(e, path) == DATA
            assert e.files.size(record.id) is None
        assert e.meta.blob_refs(e.meta.get("a1/x.bin").blob) == 2
    finally:
        e.close()


# --- find, writing, cancel -----------------------------------------------------------------------

@pytest.mark.parametrize("upload_id", ["", "short", "../../../../etc/passwd", "A" * 31, "A" * 33, "\u00e9" * 32,
                                       "A" * 31 + "/", "A" * 31 + "\n"])
def test_find_refuses_ids_that_are_not_ids(engine: Engine, upload_id: str) -> None:
    with pytest.raises(HTTPError) as e:
        engine.uploads.find(upload_id, NOW)
    assert status_of(e) == 404


def test_find_unknown_id_is_404(engine: Engine) -> None:
    with pytest.raises(HTTPError) as e:
        engine.uploads.find(new_upload_id(), NOW)
    assert status_of(e) == 404


def test_find_expired_is_410_once_and_removes_it(engine: Engine) -> None:
    """At its expiry an upload answers 410, and is gone afterwards (row and bytes): 404."""
    record = create(engine)
    append(engine, record.id, [DATA[:10]])
    assert engine.uploads.find(record.id, NOW + EXPIRY - 0.001).id == record.id
    with pytest.raises(HTTPError) as e:
        engine.uploads.find(record.id, NOW + EXPIRY)
    assert status_of(e) == 410
    assert engine.meta.partial_get(record.id) is None and engine.files.size(record.id) is None
    with pytest.raises(HTTPError) as e:
        engine.uploads.find(record.id, NOW + EXPIRY)
    assert status_of(e) == 404


def test_find_an_upload_whose_bytes_are_gone_is_404(engine: Engine) -> None:
    """The partial file removed by hand: nothing to resume, so the row goes too."""
    record = create(engine)
    os.unlink(engine.files.path(record.id))
    with pytest.raises(HTTPError) as e:
        engine.uploads.find(record.id, NOW)
    assert status_of(e) == 404 and engine.meta.partial_get(record.id) is None


def test_writing_yields_the_record_as_it_is_when_the_turn_comes(engine: Engine) -> None:
    """A request that found the upload before another finished it sees it completed."""
    record = create(engine)
    append(engine, record.id, [DATA])
    stale = engine.uploads.find(record.id, NOW)
    finish(engine, record.id)
    with engine.uploads.writing(stale, None, NOW) as (fresh, _attachment):
        assert fresh.completed and not stale.completed


def test_writing_an_upload_cancelled_meanwhile_is_404(engine: Engine) -> None:
    record = create(engine)
    stale = engine.uploads.find(record.id, NOW)
    engine.uploads.cancel(stale)
    with pytest.raises(HTTPError) as e, engine.uploads.writing(stale, None, NOW):
        pass
    assert status_of(e) == 404


def test_cancel_never_removes_a_committed_file(engine: Engine) -> None:
    record = create(engine)
    append(engine, record.id, [DATA])
    finish(engine, record.id)
    engine.uploads.cancel(engine.uploads.find(record.id, NOW))
    assert engine.meta.partial_get(record.id) is None
    assert committed(engine) == DATA and engine.meta.get(PATH) is not None


def test_an_append_to_a_completed_upload_is_an_http_answer(engine: Engine) -> None:
    """After the commit the partial file is gone; an append (an empty chunked tus PATCH at
    offset == length gets here: handlers/tus.py _write has no completed check) must answer with
    the length or an HTTPError, not escape as FileNotFoundError (a 500 with a traceback)."""
    record = create(engine)
    append(engine, record.id, [DATA])
    finish(engine, record.id)
    try:
        assert append(engine, record.id, []) == len(DATA)
    except HTTPError:
        pass


def test_find_does_not_remove_an_upload_a_writer_holds(engine: Engine) -> None:
    """The sweep leaves an upload being written alone; a request's find (a HEAD or PATCH that
    arrives to take over, before its turn) must not remove it from under that writer either."""
    record = create(engine)
    with engine.uploads.writers.hold(record.id, None):
        try:
            engine.uploads.find(record.id, NOW + EXPIRY)
        except HTTPError:
            pass  # it may say 410, but the upload is the writer's until it lets go
        assert engine.files.size(record.id) == 0 and engine.meta.partial_get(record.id) is not None


# --- sweep ---------------------------------------------------------------------------------------

def _age(path: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_removes_expired_uploads_and_their_bytes(engine: Engine) -> None:
    old = create(engine, now=NOW)
    fresh = create(engine, now=NOW + 1000)
    append(engine, old.id, [DATA[:10]])
    assert engine.uploads.sweep(NOW + EXPIRY) == 1
    assert engine.meta.partial_get(old.id) is None and engine.files.size(old.id) is None
    assert engine.meta.partial_get(fresh.id) is not None and engine.files.size(fresh.id) == 0


def test_sweep_keeps_an_expired_upload_being_written(engine: Engine) -> None:
    """A request holding the upload is still writing it: the sweep leaves it for next time."""
    record = create(engine)
    with engine.uploads.writers.hold(record.id, None):
        assert engine.uploads.sweep(NOW + EXPIRY + 1) == 0
    assert engine.meta.partial_get(record.id) is not None and engine.files.size(record.id) == 0
    assert engine.uploads.sweep(NOW + EXPIRY + 1) == 1
    assert engine.meta.partial_get(record.id) is None and engine.files.size(record.id) is None


def test_sweep_removes_old_orphan_files_only(engine: Engine) -> None:
    """A partial file without a row (a crash between file and row) goes once ORPHAN_AGE old; a
    younger one may be a creation in progress, and files that are not upload ids are not ours."""
    old, young = new_upload_id(), new_upload_id()
    engine.files.create(old)
    engine.files.create(young)
    _age(engine.files.path(old), ORPHAN_AGE + 60)
    _age(engine.files.path(young), ORPHAN_AGE - 60)
    stranger = os.path.join(engine.files.directory, "not-an-upload-id")
    Path(stranger).write_bytes(b"x")
    _age(stranger, ORPHAN_AGE * 10)
    live = create(engine)
    _age(engine.files.path(live.id), ORPHAN_AGE * 10)  # old but with a row: not an orphan
    assert engine.uploads.sweep(NOW) == 1
    assert engine.files.size(old) is None and engine.files.size(young) == 0
    assert os.path.exists(stranger) and engine.files.size(live.id) == 0


def test_sweep_removes_expired_completed_rows_but_not_the_file(engine: Engine) -> None:
    record = create(engine)
    append(engine, record.id, [DATA])
    finish(engine, record.id, now=NOW)
    assert engine.uploads.sweep(NOW + EXPIRY) == 1
    assert engine.meta.partial_get(record.id) is None
    assert committed(engine) == DATA


# --- Writers: one writer, takeover ---------------------------------------------------------------

UID = "U" * 32


def counting_writers(wait: float) -> tuple[Writers, list[int]]:
    """Writers whose takeovers are counted: one 1 in the list for each."""
    takeovers: list[int] = []
    return Writers(wait=wait, on_takeover=lambda: takeovers.append(1)), takeovers


@contextlib.contextmanager
def held_elsewhere(writers: Writers, sock: Optional[socket.socket] = None, stalled: bool = False) -> Iterator[None]:
    """Another thread holds UID through `sock` (with `stalled`: reading a body that stopped coming
    STALE_AFTER ago) until the block ends."""
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with writers.hold(UID, sock) as entry:
            if stalled:
                entry.reading, entry.progress = True, time.monotonic() - STALE_AFTER
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert holding.wait(5)
        yield
    finally:
        release.set()
        thread.join(5)


def test_holds_take_turns_and_share_the_attachment() -> None:
    """The state (digest) carried between requests lives on the one attachment per upload."""
    writers = Writers(wait=1.0)
    with writers.hold(UID, None) as first:
        first.digest_at = 42
        assert writers.busy(UID)
    assert not writers.busy(UID)
    with writers.hold(UID, None) as second:
        assert second is first and second.digest_at == 42


def test_a_hold_records_and_clears_its_socket() -> None:
    writers = Writers(wait=1.0)
    a, b = socket.socketpair()
    with a, b:
        with writers.hold(UID, a) as entry:
            assert entry.sock is a
        assert entry.sock is None  # a later newcomer must not shut down a finished request's socket


def test_different_uploads_do_not_wait_for_each_other() -> None:
    writers = Writers(wait=5.0)
    with writers.hold(UID, None):
        started = time.monotonic()
        with writers.hold("V" * 32, None):
            assert time.monotonic() - started < 0.5


def test_takeover_cuts_the_stale_connection() -> None:
    """Thread 1 holds the upload and blocks reading a dead connection; thread 2's hold shuts
    that socket down, so thread 1's recv returns b'' at once and thread 2 proceeds within ~1 s
    (not after the 30 s TAKEOVER_WAIT or the read timeout). on_takeover counts it once."""
    writers, takeovers = counting_writers(10.0)
    stale, phone = socket.socketpair()
    stale.settimeout(10)  # if the cut never comes, the test fails instead of hanging
    holding = threading.Event()
    seen: dict[str, object] = {}

    def old_request() -> None:
        with writers.hold(UID, stale) as entry:
            entry.reading, entry.progress = True, time.monotonic() - STALE_AFTER  # a body that stopped coming
            holding.set()
            try:
                seen["data"] = stale.recv(1)
            except OSError as e:
                seen["data"] = e
            seen["at"] = time.monotonic()

    thread = threading.Thread(target=old_request, daemon=True)
    thread.start()
    try:
        assert holding.wait(5)
        time.sleep(0.05)  # let it block in recv
        started = time.monotonic()
        with writers.hold(UID, None) as entry:
            took = time.monotonic() - started
            assert entry.sock is None
        thread.join(5)
        assert seen["data"] == b"", seen["data"]
        assert isinstance(seen["at"], float) and seen["at"] - started < 1.0  # the stale read ended promptly
        assert took < 1.0, took
        assert takeovers == [1]
        assert not writers.busy(UID)
    finally:
        stale.close()
        phone.close()


def test_takeover_of_an_append_keeps_the_bytes_it_wrote(engine: Engine) -> None:
    """The real case: a PATCH reading a socket whose phone moved networks. A new request takes
    over: the old append ends with BodyTruncated, keeping the 3000 bytes that arrived, and the
    new request sees offset 3000 and a digest that matches; the upload then completes."""
    engine.uploads.writers, takeovers = counting_writers(10.0)
    record = create(engine)
    stale, phone = socket.socketpair()
    stale.settimeout(10)
    outcome: dict[str, object] = {}

    def old_patch() -> None:
        rfile = stale.makefile("rb", buffering=0)  # what the old request reads its body from
        body = LengthBody(rfile, len(DATA))
        try:
            with rfile, engine.uploads.writing(record, stale, NOW) as (current, attachment):
                outcome["offset"] = engine.uploads.append(current, attachment, body, memoryview(bytearray(1024)),
                                                          NOW)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=old_patch, daemon=True)
    thread.start()
    try:
        phone.sendall(DATA[:3000])  # then the phone goes silent
        if engine.files.keyring is None:  # plain partials are written through as bytes arrive
            deadline = time.monotonic() + 5
            while engine.files.size(record.id) != 3000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.files.size(record.id) == 3000
        else:  # sealed ones gather up to a record in memory: sealed when the request ends
            time.sleep(0.3)
            assert engine.files.size(record.id) == 0
        started = time.monotonic()
        with engine.uploads.writing(record, None, NOW) as (current, attachment):
            took = time.monotonic() - started
            assert engine.uploads.offset(current) == 3000
            assert digest_covers(engine, attachment, 3000)
        thread.join(5)
        assert took < STALE_AFTER + 1.0, took  # cut once its body stopped for STALE_AFTER, not the read timeout
        assert isinstance(outcome.get("error"), BodyTruncated), outcome
        assert takeovers == [1]
        append(engine, record.id, [DATA[3000:]])
        assert finish(engine, record.id).sha256 == sha(DATA)
    finally:
        stale.close()
        phone.close()


def test_a_holder_without_a_socket_makes_the_newcomer_wait_then_423() -> None:
    """Nothing to cut (no connection attached): the newcomer waits `wait` seconds and gets 423
    with Retry-After; no takeover is counted; once the holder releases, the upload is free."""
    writers, takeovers = counting_writers(0.5)
    with held_elsewhere(writers):
        started = time.monotonic()
        with pytest.raises(UploadBusy) as e, writers.hold(UID, None):
            pass
        waited = time.monotonic() - started
        assert 0.45 <= waited < 3.0, waited
        assert e.value.status == 423 and e.value.headers.get("Retry-After") == "1"
        assert takeovers == []
    with writers.hold(UID, None):
        pass


def test_a_holder_that_ignores_the_cut_still_bounds_the_wait() -> None:
    """A holder that keeps the upload although its socket was shut down: 423 after `wait`."""
    writers, takeovers = counting_writers(0.5)
    stale, phone = socket.socketpair()
    try:
        with held_elsewhere(writers, stale, stalled=True):
            with pytest.raises(UploadBusy), writers.hold(UID, None):
                pass
            assert takeovers == [1]
            assert phone.recv(1) == b""  # the cut did happen: the peer sees the connection end
    finally:
        stale.close()
        phone.close()


@pytest.mark.parametrize("reading", [True, False], ids=["receiving", "not-reading"])
def test_a_live_holder_is_waited_for_not_cut(reading: bool) -> None:
    """A holder whose body is still arriving (or that is committing or answering: not reading)
    is not cut: the newcomer waits its turn. A request that sat unread in a buffer while its
    client resumed elsewhere must not cut the request that resumed."""
    writers, takeovers = counting_writers(10.0)
    live, client = socket.socketpair()
    holding = threading.Event()

    def holder() -> None:
        with writers.hold(UID, live) as entry:
            entry.reading = reading
            holding.set()
            end = time.monotonic() + STALE_AFTER * 2
            while time.monotonic() < end:  # bytes keep arriving
                entry.progress = time.monotonic()
                time.sleep(0.05)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        with writers.hold(UID, None):
            waited = time.monotonic() - started
        assert waited >= STALE_AFTER * 1.5, waited  # it waited for the holder to finish
        assert takeovers == []
        live.setblocking(False)
        client.sendall(b"x")
        assert live.recv(1) == b"x"  # the live connection was not shut down
    finally:
        thread.join(5)
        live.close()
        client.close()


def test_forget_drops_the_attachment() -> None:
    """A removed upload's state goes (no digest survives into a new upload with its id)."""
    writers = Writers(wait=1.0)
    with writers.hold(UID, None) as entry:
        entry.digest_at = 7
    writers.forget(UID)
    with writers.hold(UID, None) as again:
        assert again is not entry and again.digest_at == -1


# --- PartialFiles and sealed partials -----------------------------------------------------------

def test_partial_files_plain_basics(tmp_path: Path) -> None:
    """The plain file's length is the offset; a writer opens only at the upload's offset and can
    cut back to where it started (a discarded chunk); ids are the only names."""
    files = PartialFiles(str(tmp_path / "partials"))
    assert (os.stat(files.directory).st_mode & 0o777) == 0o700
    uid = new_upload_id()
    files.create(uid)
    with pytest.raises(FileExistsError):
        files.create(uid)
    assert files.size(uid) == 0 and not files.is_sealed(uid)
    writer = files.open_at(uid, 0)
    writer.write(memoryview(b"0123"))
    writer.sync()
    writer.close()
    writer = files.open_at(uid, 4)
    writer.write(memoryview(b"456"))
    writer.write(memoryview(b"789"))
    with pytest.raises(ValueError):
        writer.cut(7)  # only back to where this writer started
    writer.cut(4)
    writer.write(memoryview(b"ab"))
    writer.sync()
    writer.close()
    assert Path(files.path(uid)).read_bytes() == b"0123ab" and files.size(uid) == 6
    with pytest.raises(ValueError):
        files.open_at(uid, 5)  # not the upload's offset
    assert b"".join(files.read(uid, 4)) == b"0123"
    with pytest.raises(PartialCorrupt):
        b"".join(files.read(uid, 7))  # more than it holds
    assert files.remove(uid) and not files.remove(uid) and files.size(uid) is None
    with pytest.raises(FileNotFoundError):
        files.open_at(uid, 0)
    for bad in ("../x", "A" * 31, "A" * 31 + "/", "", "A" * 32 + SEALED):
        with pytest.raises(ValueError):
            files.path(bad)


def test_new_upload_ids_are_ids_and_unique() -> None:
    ids = {new_upload_id() for _ in range(200)}
    assert len(ids) == 200
    for uid in ids:
        assert UPLOAD_ID.fullmatch(uid) and len(base64.urlsafe_b64decode(uid)) == 24  # 192 random bits


def sealed_engine(tmp_path: Path) -> Engine:
    return build(tmp_path / "store", ring=keyring())


def test_a_sealed_partial_never_holds_plaintext(tmp_path: Path) -> None:
    """With encryption at rest an abandoned upload is not readable on disk."""
    e = sealed_engine(tmp_path)
    try:
        secret = b"attack at dawn " * 100
        record = create(e, len(secret))
        append(e, record.id, [secret[:700], secret[700:]])
        raw = Path(e.files.path(record.id)).read_bytes()
        assert e.files.path(record.id).endswith(SEALED) and raw.startswith(MAGIC)
        assert b"attack at dawn" not in raw
        assert held(e, record.id) == secret and e.files.size(record.id) == len(secret)
    finally:
        e.close()


def test_a_record_cut_short_by_a_crash_is_not_counted_and_is_cut(tmp_path: Path) -> None:
    """kill -9 in the middle of sealing a record: the offset is the complete records' bytes, and
    the next append cuts the torn record before writing, so the upload still commits right."""
    e = sealed_engine(tmp_path)
    try:
        record = create(e)
        append(e, record.id, [DATA[:1000]])
        with open(e.files.path(record.id), "ab") as f:
            f.write(b"\x00\x00\x10\x00" + b"torn record")  # a record head promising 4096 bytes, then the crash
        assert e.files.size(record.id) == 1000
        append(e, record.id, [DATA[1000:]])
        assert held(e, record.id) == DATA
        assert finish(e, record.id).sha256 == sha(DATA) and committed(e) == DATA
    finally:
        e.close()


def test_a_tampered_sealed_partial_is_a_500_not_a_commit(tmp_path: Path) -> None:
    """A flipped ciphertext byte fails authentication: nothing is committed from it."""
    ring = keyring()
    first = build(tmp_path / "store", ring=ring)
    record = create(first)
    append(first, record.id, [DATA])
    first.close()
    path = first.files.path(record.id)
    raw = bytearray(Path(path).read_bytes())
    raw[200] ^= 1
    Path(path).write_bytes(bytes(raw))
    second = build(tmp_path / "store", ring=ring)  # restarted: the digest must be rebuilt from the file
    try:
        with pytest.raises(HTTPError) as e:
            finish(second, record.id)
        assert status_of(e) == 500
        assert not second.store.exists(PATH) and second.meta.get(PATH) is None
        assert os.listdir(second.store.tmp_dir) == []
    finally:
        second.close()


def test_a_sealed_partial_without_the_key_is_a_500(tmp_path: Path) -> None:
    """Restarted with encryption off: a sealed upload cannot be read; a clear HTTP 500, not a crash."""
    first = sealed_engine(tmp_path)
    record = create(first)
    append(first, record.id, [DATA[:100]])
    first.close()
    second = build(tmp_path / "store")
    try:
        assert second.uploads.offset(second.uploads.find(record.id, NOW)) == 100
        with pytest.raises(HTTPError) as e:
            append(second, record.id, [DATA[100:]])
        assert status_of(e) == 500
    finally:
        second.close()


def test_a_plain_partial_commits_encrypted_once_encryption_is_on(tmp_path: Path) -> None:
    """An upload begun before encryption was turned on stays plain, and is encrypted into the store."""
    first = build(tmp_path / "store")
    record = create(first)
    append(first, record.id, [DATA[:100]])
    first.close()
    second = sealed_engine(tmp_path)
    try:
        assert not second.files.is_sealed(record.id)
        append(second, record.id, [DATA[100:]])
        stored = finish(second, record.id)
        assert stored.encrypted and stored.sha256 == sha(DATA) and committed(second) == DATA
    finally:
        second.close()


def test_an_append_of_many_tiny_reads_uses_bounded_memory(plain: Engine) -> None:
    """A chunked PATCH of one-byte chunks (any client may send one) makes one write per byte;
    the engine must not keep per-write state for the whole request (a 32 MB chunksize append
    would then hold ~3.7 GB)."""
    count = 40_000
    record = create(plain, count)
    wire = b"1\r\nx\r\n" * count + b"0\r\n\r\n"
    buf = memoryview(bytearray(64 * 1024))
    found = plain.uploads.find(record.id, NOW)
    with plain.uploads.writing(found, None, NOW) as (current, attachment):
        body = ChunkedBody(io.BytesIO(wire), count)
        tracemalloc.start()
        try:
            assert plain.uploads.append(current, attachment, body, buf, NOW) == count
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1_000_000, f"{peak:,} bytes at the peak for {count:,} one-byte reads"
