"""Full, read-only, deep and shared storage, on real filesystems with the real process.

Why: the contract promises that an upload succeeds whole (201 and metadata recorded) or
leaves nothing, that a full disk is a clean 507 wherever it strikes (before the body,
while the data streams, or between the data and its metadata), that the server refuses
to start on storage it cannot write or that another hmacfs owns, and that names the
filesystem cannot hold are a 414 rather than a 500. None of that can be shown with
mocks: a tmpfs of a few MiB gives real ENOSPC and EROFS, and two real processes give a
real lock conflict. A refused mount (not root, a container without CAP_SYS_ADMIN) skips
with the reason, even under HMACFS_REQUIRE_ALL: it is the machine, not hmacfs.
"""
from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pytest

from hmacfs import auth
from tests.support.client import request, signed_put, signed_v3, status_of, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.mounts import MountRefused, remount_ro, tmpfs

PAGE = 4096
MiB = 1024 * 1024
START_TIMEOUT = 15.0  # a server that should come up (a loaded 2-core machine is slow)
REFUSE_WITHIN = 5.0  # a server that must refuse to start exits within this

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """`mount(name, size)`: a tmpfs at tmp_path/name, unmounted after the test (after the servers)."""
    with contextlib.ExitStack() as stack:

        def mount(name: str, size: str) -> Path:
            try:
                return stack.enter_context(tmpfs(tmp_path / name, size))
            except MountRefused as e:
                pytest.skip(f"mounting a tmpfs was refused: {e}")

        yield mount


@pytest.fixture
def servers(tmp_path: Path, mounts) -> Iterator[Callable[..., HmacfsProcess]]:
    """`server(config, start=True)`: an HmacfsProcess with its work dir and log in tmp_path
    (never on a test mount); all stopped before the mounts go (this fixture depends on them)."""
    with contextlib.ExitStack() as stack:  # closes every one, even when one fails to stop

        def server(config: Optional[dict[str, Any]] = None, start: bool = True) -> HmacfsProcess:
            proc = HmacfsProcess(tmp_path / f"srv{len(stack._exit_callbacks)}", config)
            stack.callback(proc.close)
            return proc.start(START_TIMEOUT) if start else proc

        yield server


# -- helpers -------------------------------------------------------------------------------------


def on(storage: Path, **server: object) -> dict[str, Any]:
    """Config overrides: storage at `storage`, no free-space reserve unless given."""
    return {"server": {"storagepath": str(storage), "minfreebytes": "0", **server}}


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def temp_files(storage: Path) -> list[str]:
    return sorted(os.listdir(storage / ".hmacfs" / "tmp"))


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.01)


def assert_up_and_clean(srv: HmacfsProcess) -> None:
    """The server still answers and never logged a traceback."""
    assert request(srv.port, "GET", "/health", timeout=5).status == 200
    assert "Traceback" not in srv.log(), srv.log()


def assert_nothing_left(srv: HmacfsProcess, storage: Path, signed_path: str) -> None:
    """No file at the path, no temp file, and a GET says 404."""
    assert not (storage / signed_path).exists()
    assert temp_files(storage) == []
    assert request(srv.port, "GET", url_path(srv.prefix, signed_path), timeout=5).status == 404


def fill_up(path: Path) -> None:
    """Write `path` until the filesystem is full (ENOSPC), to its last page."""
    block = b"\0" * (64 * 1024)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                if not f.write(block):
                    return
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return


@dataclass
class Reply:
    status: Optional[int]  # None: the connection was cut before a status line arrived
    sent: int              # body bytes handed to the socket before the client stopped
    raw: bytes


def stream(srv: HmacfsProcess, head: bytes, pieces: Iterable[bytes], timeout: float = 15.0) -> Reply:
    """Send a request head, then body pieces while the server has not answered; read its answer.

    The client stops sending as soon as a response is readable (an early 507 or 413) or the
    server cuts the connection, as a browser would.
    """
    sent, data = 0, b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for piece in pieces:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
    status = status_of(data) if data.startswith(b"HTTP/1.") else None
    return Reply(status, sent, data)


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    """`total` bytes as pieces of `piece` (the last one cut)."""
    left = total
    while left > 0:
        yield piece[:left]
        left -= len(piece)


def chunked(piece: bytes, total: int) -> Iterator[bytes]:
    for part in repeat(piece, total):
        yield b"%x\r\n" % len(part) + part + b"\r\n"
    yield b"0\r\n\r\n"


def put_head(target: str, length: Optional[int] = None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"PUT {target} HTTP/1.1\r\nHost: x\r\n{framing}\r\n{extra}\r\n".encode()


def upload_target(srv: HmacfsProcess, protocol: str, signed_path: str, size: int) -> tuple[str, dict[str, str]]:
    """Request target and headers of an upload signed with `protocol` ("v" or "jwt")."""
    if protocol == "v":
        return signed_put(srv.prefix, srv.secret, signed_path, size), {}
    slot, _, filename = signed_path.partition("/")
    now = int(time.time())
    claims = {"exp": now + 300, "slot": slot, "filename": filename, "filesize": size, "expires": now + 3600,
              "sub": "bob@localhost"}
    token = auth.jwt_encode(srv.secret.encode(), claims)
    return url_path(srv.prefix, signed_path), {"Authorization": "Bearer " + token}


def expect_start_failure(srv: HmacfsProcess) -> str:
    """Start a server that must refuse: it exits non-zero within REFUSE_WITHIN; returns its log."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="hmacfs exited"):
        srv.start(REFUSE_WITHIN)
    assert time.monotonic() - started < REFUSE_WITHIN
    assert srv.proc is not None and srv.proc.returncode not in (0, None)
    log = srv.log()
    assert "Traceback" not in log, log
    return log


def lines_naming(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


# -- 1. the disk fills between the data and the metadata --------------------------------------


def blob_files(store: Path) -> list[Path]:
    return [p for p in (store / ".hmacfs" / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("protocol,dedup", [("v", False), ("jwt", False), ("v", True)])
def test_full_disk_at_the_metadata_write_leaves_nothing(servers, mounts, protocol: str, dedup: bool) -> None:
    store = mounts("store", "8m")
    srv = servers({**on(store), "deduplication": {"enabled": dedup}})
    warm, warm_headers = upload_target(srv, "v", f"{uuid.uuid4()}/warm.txt", 1)
    assert request(srv.port, "PUT", warm, b"w", warm_headers).status == 201  # the SQLite WAL exists now
    wal = store / ".hmacfs" / "meta.sqlite3-wal"
    wal_before = wal.stat().st_size

    size = 16 * PAGE
    free = free_bytes(store)
    assert free % PAGE == 0 and free > size
    (store / "filler").write_bytes(b"\0" * (free - size))
    assert free_bytes(store) == size  # room for the data, to the page; none for a WAL frame

    path = f"{uuid.uuid4()}/data.bin"
    body = os.urandom(size)
    target, headers = upload_target(srv, protocol, path, size)
    r = request(srv.port, "PUT", target, body, headers)
    assert r.status == 507, r
    # The data fitted, so the metadata write was reached: SQLite filled the WAL's last page and
    # failed on the next one (a failure on the data would have left the WAL untouched).
    assert wal.stat().st_size > wal_before, "the metadata write was never attempted"
    assert_nothing_left(srv, store, path)
    if dedup:
        assert len(blob_files(store)) == 1  # the warm-up file's blob; no orphan from the failed upload
    assert_up_and_clean(srv)

    (store / "filler").unlink()
    r = request(srv.port, "PUT", target, body, headers)  # the same URL works again
    assert r.status == 201, r
    got = request(srv.port, "GET", url_path(srv.prefix, path))
    assert got.status == 200 and got.body == body
    assert temp_files(store) == []
    assert_up_and_clean(srv)


# -- 2. ENOSPC while the data streams ------------------------------------------------------------


def test_upload_larger_than_the_disk_507_before_the_body(servers, mounts) -> None:
    store = mounts("store", "8m")
    srv = servers(on(store))
    earlier = f"{uuid.uuid4()}/earlier.txt"
    assert request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, earlier, 5), b"hello").status == 201

    path, size = f"{uuid.uuid4()}/big.bin", 12 * MiB
    reply = stream(srv, put_head(signed_put(srv.prefix, srv.secret, path, size), size),
                   repeat(b"b" * (64 * 1024), size))
    assert reply.status in (507, None), reply.raw[:300]
    assert_nothing_left(srv, store, path)  # also the "next request" when the reply was cut off
    got = request(srv.port, "GET", url_path(srv.prefix, earlier))
    assert got.status == 200 and got.body == b"hello"
    assert_up_and_clean(srv)


def test_enospc_mid_stream_507_and_nothing_partial(servers, mounts) -> None:
    store = mounts("store", "8m")
    srv = servers(on(store))
    earlier = f"{uuid.uuid4()}/earlier.txt"
    assert request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, earlier, 5), b"hello").status == 201

    path, size, first = f"{uuid.uuid4()}/big.bin", 6 * MiB, 3 * MiB
    target = signed_put(srv.prefix, srv.secret, path, size)
    piece = b"s" * (64 * 1024)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
    try:
        s.sendall(put_head(target, size) + b"s" * first)
        tmp = store / ".hmacfs" / "tmp"
        wait_until(lambda: any(p.stat().st_size >= first for p in tmp.iterdir()), "the first 3 MiB on disk")
        fill_up(store / "filler")  # the disk is now full, mid-upload
        assert free_bytes(store) == 0
        sent = first
        try:
            while sent < size and not select.select([s], [], [], 0)[0]:
                s.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    finally:
        s.close()
    if data:
        assert status_of(data) == 507, data[:300]
    assert_nothing_left(srv, store, path)
    got = request(srv.port, "GET", url_path(srv.prefix, earlier))
    assert got.status == 200 and got.body == b"hello"
    assert_up_and_clean(srv)

    (store / "filler").unlink()
    assert request(srv.port, "PUT", target, b"s" * size).status == 201  # the slot stayed free
    assert (store / path).stat().st_size == size


# -- 3. minfreebytes as a chunked body grows -------------------------------------------------------


class PeakUsage(threading.Thread):
    """The most a filesystem held, sampled every few ms (a lower bound of the true peak)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.peak = used_bytes(path)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, used_bytes(self.path))

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        return max(self.peak, used_bytes(self.path))


def test_minfreebytes_enforced_as_a_chunked_body_grows(servers, mounts) -> None:
    store = mounts("store", "16m")
    srv = servers(on(store, minfreebytes="8MB"))
    path, size = f"{uuid.uuid4()}/chunked.bin", 12 * MiB  # would fit the 16 MiB disk, not the reserve
    target = signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 300)
    baseline = used_bytes(store)
    watch = PeakUsage(store)
    watch.start()
    try:
        reply = stream(srv, put_head(target), chunked(b"c" * (64 * 1024), size))
    finally:
        peak = watch.stop()
    assert reply.status == 507, reply.raw[:300]
    # free space is checked every MiB: the body never took more than (disk - reserve) + 1 MiB
    assert peak - baseline <= 16 * MiB - 8 * MiB + 1 * MiB, (peak - baseline) / MiB
    assert_nothing_left(srv, store, path)
    assert_up_and_clean(srv)


# -- 4. read-only storage at start ----------------------------------------------------------------


def test_read_only_storage_refuses_to_start(servers, mounts) -> None:
    disk = mounts("disk", "4m")
    used, fresh, missing = disk / "used", disk / "fresh", disk / "missing"
    first = servers(on(used))
    assert first.stop() == 0  # .hmacfs/, its lock and the SQLite database exist now
    assert (used / ".hmacfs" / "meta.sqlite3").exists()
    fresh.mkdir()  # never initialised
    try:
        remount_ro(disk)
    except MountRefused as e:
        pytest.skip(f"remounting the tmpfs read-only was refused: {e}")

    for storage in (used, fresh, missing):
        srv = servers(on(storage), start=False)
        log = expect_start_failure(srv)
        named = lines_naming(log, str(storage))
        assert len(named) == 1, log  # one line says it all
        assert "not usable" in named[0] or "not writable" in named[0], log
        assert "Read-only file system" in named[0], log


# -- 5. long paths: 414, not 500 ------------------------------------------------------------------


def names(span: int, width: int) -> list[str]:
    """Names of at most `width` bytes that, each with its "/", take exactly `span` bytes."""
    out: list[str] = []
    while span > 0:
        size = min(width, span - 1)
        if span - (size + 1) == 1:  # a single byte left could not hold "/x"
            size -= 1
        assert size > 0, span
        out.append("n" * size)
        span -= size + 1
    return out


def nested(base: Path, total: int) -> Path:
    """A new directory below `base` whose absolute path is exactly `total` bytes long."""
    path = base.joinpath(*names(total - len(str(base)), 250))
    path.mkdir(parents=True)
    assert len(str(path)) == total
    return path


def segments_path(total: int, name: str = "f.txt") -> str:
    """A signed path of exactly `total` bytes: directories of up to 240 bytes, then `name`."""
    path = "/".join([*names(total - len(name), 240), name])
    assert len(path) == total
    return path


def assert_414_put_and_get(srv: HmacfsProcess, path: str) -> None:
    r = request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, 1), b"x")
    assert r.status == 414, r
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 414, r


def test_storage_root_too_long_for_sqlite_is_a_clear_start_up_error(servers, tmp_path: Path) -> None:
    """SQLite opens no database below a root longer than ~483 bytes: refuse to start, and say why."""
    root = nested(tmp_path / "long", 3000)
    with pytest.raises(RuntimeError) as e:
        servers(on(root))
    assert "storage path is too long" in str(e.value) and "Traceback" not in str(e.value)


def test_path_at_the_limit_of_the_root_201_one_byte_more_414(servers, tmp_path: Path) -> None:
    root = nested(tmp_path / "mid", 400)  # SQLite (3.40, MAX_PATHNAME 512) opens no root over ~483 bytes
    srv = servers(on(root))
    limit = 4096 - len(os.fsencode(root)) - 2  # root + "/" + path + NUL fills PATH_MAX exactly
    assert_414_put_and_get(srv, segments_path(limit + 1))
    path = segments_path(limit)
    assert request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, 4), b"deep").status == 201
    got = request(srv.port, "GET", url_path(srv.prefix, path))
    assert got.status == 200 and got.body == b"deep"
    assert temp_files(root) == []
    assert_up_and_clean(srv)


def test_too_many_segments_414(servers, tmp_path: Path) -> None:
    srv = servers(on(tmp_path / "plain"))
    path = "a/" * 1333 + "f.txt"
    assert_414_put_and_get(srv, path)
    assert not (tmp_path / "plain" / "a").exists()
    assert temp_files(tmp_path / "plain") == []
    assert_up_and_clean(srv)


# -- 6. two servers, one store -------------------------------------------------------------------


def test_second_server_on_a_store_in_use_refuses(servers, tmp_path: Path) -> None:
    storage = tmp_path / "shared"
    a = servers(on(storage))
    path, size, half = f"{uuid.uuid4()}/inflight.bin", 100_000, 50_000
    s = socket.create_connection(("127.0.0.1", a.port), timeout=15)
    try:
        s.sendall(put_head(signed_put(a.prefix, a.secret, path, size), size) + b"h" * half)
        tmp = storage / ".hmacfs" / "tmp"
        # a body this small is read whole before it is written: its temp file exists, empty, meanwhile
        wait_until(lambda: any(tmp.iterdir()), "the upload's temp file")
        in_flight = temp_files(storage)

        b = servers(on(storage), start=False)
        log = expect_start_failure(b)
        named = lines_naming(log, str(storage))
        assert len(named) == 1 and "in use by another hmacfs process" in named[0], log
        assert temp_files(storage) == in_flight  # B swept nothing of A's

        s.sendall(b"h" * (size - half))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert status_of(data) == 201, data
    finally:
        s.close()
    assert (storage / path).read_bytes() == b"h" * size
    assert_up_and_clean(a)
    assert a.stop() == 0

    b2 = servers(on(storage))  # the store is free now
    got = request(b2.port, "GET", url_path(b2.prefix, path))
    assert got.status == 200 and got.body == b"h" * size
    assert temp_files(storage) == []
    assert_up_and_clean(b2)


# -- 7. deduplication across filesystems: metadata references ----------------------------------


def test_blobs_on_another_filesystem_are_metadata_references(servers, mounts) -> None:
    """No hard link can cross filesystems: each path is a row that points at its blob. The
    409 rule, downloads, deletes and a missing blob (500, logged once) all still hold."""
    store, elsewhere = mounts("store", "16m"), mounts("blobs", "16m")
    srv = servers({**on(store), "deduplication": {"enabled": True, "directory": str(elsewhere)}})
    data = os.urandom(50_000)
    a, b = f"{uuid.uuid4()}/a.bin", f"{uuid.uuid4()}/b.bin"
    for p in (a, b):
        assert request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, p, len(data)), data).status == 201
        assert not (store / p).exists()  # no file at the path: a reference
    assert len([p for p in elsewhere.rglob("*") if p.is_file()]) == 1
    assert request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, a, len(data)), data).status == 409
    got = request(srv.port, "GET", url_path(srv.prefix, a), headers={"Range": "bytes=10-19"})
    assert got.status == 206 and got.body == data[10:20]
    r = request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, a, "DELETE", int(time.time()) + 60))
    assert r.status == 204 and request(srv.port, "GET", url_path(srv.prefix, a)).status == 404
    assert request(srv.port, "GET", url_path(srv.prefix, b)).body == data
    blob = next(p for p in elsewhere.rglob("*") if p.is_file())
    blob.unlink()  # an operator's mistake: the bytes behind a row are gone
    for _ in range(2):
        assert request(srv.port, "GET", url_path(srv.prefix, b)).status == 500
    assert len(lines_naming(srv.log(), "stored bytes missing")) == 1
    assert "Traceback" not in srv.log()
    assert request(srv.port, "GET", "/health").status == 200
