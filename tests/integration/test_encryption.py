"""Encryption at rest against the real process: round trip, ciphertext-only on disk, Range,
and tampering (flip, truncate, swap two segments, splice two files) that must never come
back as altered bytes with a complete 200.
"""
from __future__ import annotations

import http.client
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.support.client import put, request, signed_v3, url_path

HEADER = 64
SEGMENT = 1024 * 1024
RECORD = SEGMENT + 28  # nonce + ciphertext + tag
K1 = "11" * 32
K2 = "22" * 32


def keyfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"keys-{uuid.uuid4().hex}"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def enc(hmacfs_factory, tmp_path: Path):
    return hmacfs_factory({"encryption": {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")},
                           "uploads": {"maxuploadsize": "20MB"}})


def pattern(size: int) -> bytes:
    block = b"PLAINTEXT-MARKER-" + bytes(range(256))
    return (block * (size // len(block) + 1))[:size]


def download(srv, path: str, headers: dict | None = None) -> tuple[int, bytes, bool]:
    """(status, body, complete): complete is False when the server cut the body short."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", url_path(srv.prefix, path), headers=headers or {})
        resp = conn.getresponse()
        try:
            return resp.status, resp.read(), True
        except http.client.IncompleteRead as e:
            return resp.status, e.partial, False
    finally:
        conn.close()


def test_round_trip_ciphertext_only_on_disk_and_ranges(enc) -> None:
    data = pattern(3 * SEGMENT + 12345)
    path = f"{uuid.uuid4()}/secret.bin"
    assert put(enc, path, data).status == 201
    on_disk = (enc.storage / path).read_bytes()
    assert on_disk[:8] == b"HMFSAEAD" and on_disk[10:12] == b"k1"
    assert b"PLAINTEXT-MARKER" not in on_disk
    assert len(on_disk) == HEADER + 4 * 28 + len(data)
    status, body, complete = download(enc, path)
    assert (status, complete) == (200, True) and body == data
    head = request(enc.port, "HEAD", url_path(enc.prefix, path))
    assert head.header("Content-Length") == str(len(data))
    for first, last in ((0, 0), (SEGMENT - 5, SEGMENT + 5), (2 * SEGMENT, 3 * SEGMENT + 100)):
        status, body, _ = download(enc, path, {"Range": f"bytes={first}-{last}"})
        assert status == 206 and body == data[first:last + 1]
    status, body, _ = download(enc, path, {"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    small = f"{uuid.uuid4()}/small.txt"
    assert put(enc, small, b"hello").status == 201
    assert download(enc, small)[1] == b"hello"
    empty = f"{uuid.uuid4()}/empty.txt"
    assert put(enc, empty, b"").status == 201
    assert download(enc, empty)[:2] == (200, b"")


def _tampered(enc, data: bytes, change) -> tuple[int, bytes, bool]:
    path = f"{uuid.uuid4()}/t.bin"
    assert put(enc, path, data).status == 201
    change(enc.storage / path)
    return download(enc, path)


def _flip(offset: int):
    def change(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
    return change


@pytest.mark.parametrize("what,change", [
    ("flip in the first segment", _flip(HEADER + 100)),
    ("flip in the third segment", _flip(HEADER + 2 * RECORD + 100)),
    ("flip a tag", _flip(HEADER + RECORD - 1)),
    ("flip the file id", _flip(50)),
    ("truncate a byte", lambda p: os.truncate(p, p.stat().st_size - 1)),
    ("truncate the last segment", lambda p: os.truncate(p, HEADER + 3 * RECORD)),
])
def test_tampering_never_yields_a_complete_200(enc, what: str, change) -> None:
    data = pattern(3 * SEGMENT + 777)
    status, body, complete = _tampered(enc, data, change)
    assert status == 500 or not complete, what
    assert body == data[:len(body)] or status == 500  # what was sent before the cut is genuine
    assert request(enc.port, "GET", "/health").status == 200


def test_swapping_segments_and_splicing_files_are_detected(enc) -> None:
    data_a, data_b = pattern(3 * SEGMENT), os.urandom(3 * SEGMENT)

    def swap(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        one, two = raw[HEADER + RECORD:HEADER + 2 * RECORD], raw[HEADER:HEADER + RECORD]
        raw[HEADER:HEADER + RECORD], raw[HEADER + RECORD:HEADER + 2 * RECORD] = one, two
        p.write_bytes(bytes(raw))

    status, _body, complete = _tampered(enc, data_a, swap)
    assert status == 500 or not complete
    other = f"{uuid.uuid4()}/other.bin"
    assert put(enc, other, data_b).status == 201
    donor = (enc.storage / other).read_bytes()

    def splice(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        raw[HEADER + RECORD:HEADER + 2 * RECORD] = donor[HEADER + RECORD:HEADER + 2 * RECORD]
        p.write_bytes(bytes(raw))

    status, body, complete = _tampered(enc, data_a, splice)
    assert (status == 500 or not complete) and len(body) <= SEGMENT
    assert "failed authentication" in enc.log()


def test_wrong_or_unknown_key_fails_clearly(hmacfs_factory, tmp_path: Path) -> None:
    srv = hmacfs_factory({"encryption": {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")}})
    path = f"{uuid.uuid4()}/k.txt"
    assert put(srv, path, b"under k1").status == 201
    srv.stop()
    srv.config["encryption"]["keyfile"] = keyfile(tmp_path, f"k1 {K2}\n")  # same id, another key
    srv.start()
    status, _body, _ = download(srv, path)
    assert status == 500
    srv.stop()
    srv.config["encryption"]["keyfile"] = keyfile(tmp_path, f"k2 {K2}\n")  # k1 is gone
    srv.start()
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 500 and b"key this server does not have" in r.body
    assert "encrypted under key" in srv.log() and K1 not in srv.log() and K2 not in srv.log()
    srv.stop()
    srv.config["encryption"]["keyfile"] = keyfile(tmp_path, f"k2 {K2}\nk1 {K1}\n")  # rotation: both
    srv.start()
    assert download(srv, path)[1] == b"under k1"
    new = f"{uuid.uuid4()}/n.txt"
    assert put(srv, new, b"under k2").status == 201
    assert (srv.storage / new).read_bytes()[10:12] == b"k2"


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("k1 notakey\n", "line 1"),
    ("", "no key"),
])
def test_bad_keyfile_is_a_clear_start_up_error(hmacfs_factory, tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "missing-keys" if content is None else Path(keyfile(tmp_path, content))
    with pytest.raises(RuntimeError) as e:
        hmacfs_factory({"encryption": {"enabled": True, "keyfile": str(path)}})
    text = str(e.value)
    assert "[encryption]" in text and "Traceback" not in text, text
    assert message in text.lower() or message in text, text


def test_encryption_with_dedup_and_versions(hmacfs_factory, tmp_path: Path) -> None:
    srv = hmacfs_factory({"encryption": {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")},
                          "deduplication": {"enabled": True},
                          "versioning": {"enableversioning": True, "maxversions": 2}})
    a, b = f"{uuid.uuid4()}/a.bin", f"{uuid.uuid4()}/b.bin"
    data = pattern(100_000)
    assert put(srv, a, data).status == 201 and put(srv, b, data).status == 201
    blobs = [p for p in (srv.storage / ".hmacfs" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].read_bytes()[:8] == b"HMFSAEAD"
    assert download(srv, a)[1] == data and download(srv, b)[1] == data
    assert put(srv, a, b"second").status == 201
    r = request(srv.port, "GET", url_path(srv.prefix, a) + "?version=1")
    assert r.status == 200 and r.body == data
    assert download(srv, a)[1] == b"second"
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, a, "DELETE",
                                                 int(time.time()) + 60)).status == 204
    assert download(srv, b)[1] == data


def test_encrypted_file_without_its_row_is_served_decrypted(enc) -> None:
    """A crash between the link and the row, or a lost database: the header says encrypted, the
    row is rebuilt from the decrypted bytes, and plaintext is what the client gets."""
    path = f"{uuid.uuid4()}/lost-row.txt"
    assert put(enc, path, b"row gone, bytes safe").status == 201
    enc.stop()
    enc.sql("DELETE FROM files WHERE path = ?", path)
    enc.start()
    status, body, _ = download(enc, path)
    assert (status, body) == (200, b"row gone, bytes safe")
    assert enc.sql("SELECT encrypted, size FROM files WHERE path = ?", path) == [(1, 20)]


def test_sighup_reloads_a_rotated_keyfile(hmacfs_factory, tmp_path: Path) -> None:
    import signal

    keys = Path(keyfile(tmp_path, f"k1 {K1}\n"))
    srv = hmacfs_factory({"encryption": {"enabled": True, "keyfile": str(keys)}})
    old = f"{uuid.uuid4()}/old.txt"
    assert put(srv, old, b"under k1").status == 201
    keys.write_text(f"k2 {K2}\nk1 {K1}\n")
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    new = f"{uuid.uuid4()}/new.txt"
    while time.monotonic() < deadline:
        probe = f"{uuid.uuid4()}/probe.txt"
        assert put(srv, probe, b"p").status == 201
        if (srv.storage / probe).read_bytes()[10:12] == b"k2":
            break
        time.sleep(0.1)
    assert put(srv, new, b"under k2").status == 201
    assert (srv.storage / new).read_bytes()[10:12] == b"k2"
    assert download(srv, old)[1] == b"under k1" and download(srv, new)[1] == b"under k2"


def test_dedup_never_mixes_plain_and_encrypted_blobs(hmacfs_factory, tmp_path: Path) -> None:
    """Turning encryption on or off between two uploads of one content: each gets a blob in its
    own form (ciphertext is never served as plaintext, plaintext never kept behind 'encrypted')."""
    data = pattern(50_000)
    srv = hmacfs_factory({"deduplication": {"enabled": True},
                          "encryption": {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")}})
    enc_path, plain_path, again = (f"{uuid.uuid4()}/{n}.bin" for n in ("e", "p", "again"))
    assert put(srv, enc_path, data).status == 201
    srv.stop()
    srv.config["encryption"]["enabled"] = False
    srv.start()
    assert put(srv, plain_path, data).status == 201
    assert download(srv, plain_path)[1] == data
    assert (srv.storage / plain_path).read_bytes() == data  # its own plain blob
    srv.stop()
    srv.config["encryption"]["enabled"] = True
    srv.start()
    assert put(srv, again, data).status == 201
    assert (srv.storage / again).read_bytes()[:8] == b"HMFSAEAD"  # linked to the encrypted blob
    assert download(srv, again)[1] == data and download(srv, enc_path)[1] == data
    blobs = sorted(p.name for p in (srv.storage / ".hmacfs" / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == 2 and blobs[0] + ".enc" == blobs[1]


@pytest.mark.parametrize("where", ["blobs", "."])
def test_a_blob_directory_in_the_served_tree_is_refused(hmacfs_factory, tmp_path: Path, where: str) -> None:
    """Inside the served tree an uploader could plant a 'blob' under a hash (and fetch any blob);
    containing the store, the orphan scan could reach user files."""
    storage = tmp_path / "store"
    directory = storage / where if where != "." else tmp_path
    with pytest.raises(RuntimeError) as e:
        hmacfs_factory({"server": {"storagepath": str(storage)},
                        "deduplication": {"enabled": True, "directory": str(directory)}})
    assert "[deduplication] directory" in str(e.value) and "Traceback" not in str(e.value)


def test_truncated_to_an_empty_file_is_not_a_complete_200(enc) -> None:
    """The plaintext size comes from the file length: cut to the header and one empty segment it
    would read 0 bytes and authenticate nothing. The row's size disagrees: 500."""
    path = f"{uuid.uuid4()}/cut.bin"
    assert put(enc, path, pattern(3 * SEGMENT)).status == 201
    os.truncate(enc.storage / path, HEADER + 28)
    r = request(enc.port, "GET", url_path(enc.prefix, path))
    assert r.status == 500 and r.body != b""


def test_encrypted_file_without_row_and_without_its_key_is_a_500_and_stays_unrecorded(
        hmacfs_factory, tmp_path: Path) -> None:
    srv = hmacfs_factory({"encryption": {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")}})
    path = f"{uuid.uuid4()}/k.txt"
    assert put(srv, path, b"under k1").status == 201
    srv.stop()
    srv.sql("DELETE FROM files WHERE path = ?", path)
    srv.config["encryption"]["keyfile"] = keyfile(tmp_path, f"k2 {K2}\n")
    srv.start()
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 500 and not r.body.startswith(b"HMFSAEAD")
    srv.stop()
    srv.config["encryption"] = {"enabled": False}
    srv.start()
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 500 and b"HMFSAEAD" not in r.body  # never ciphertext as plaintext
    srv.stop()
    srv.config["encryption"] = {"enabled": True, "keyfile": keyfile(tmp_path, f"k1 {K1}\n")}
    srv.start()
    assert download(srv, path)[1] == b"under k1"  # no wrong row was left behind
