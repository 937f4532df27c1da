"""Encrypted segment files on real temp files: round trips, ranges, every tamper, keys and keyfiles."""
from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Optional

import pytest

from hmacfs.errors import StartupError
from hmacfs.storage.encrypted import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    OVERHEAD,
    CorruptFile,
    EncryptedFileError,
    KeyfileError,
    Keyring,
    SegmentReader,
    SegmentWriter,
    TamperedError,
    UnknownKey,
    build_header,
    encrypted_size,
    load_keyfile,
    parse_header,
    parse_keyfile,
    segment_layout,
)

S = 4096
K1 = bytes(range(32))
K2 = bytes(range(100, 132))
RING = Keyring([("k1", K1)])


def write(path: Path, data: bytes, ring: Keyring = RING, size: int = S, chunk: Optional[int] = None) -> None:
    with open(path, "wb", buffering=0) as f:
        w = SegmentWriter(f, ring, size)
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            w.write(memoryview(data)[i:i + step])
        assert w.finish() == len(data)
    assert path.stat().st_size == encrypted_size(len(data), size)


def read(path: Path, ring: Keyring = RING) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        r = SegmentReader(fd, ring)
        if r.plaintext_size == 0:
            r.verify_all()
            return b""
        return b"".join(bytes(piece) for piece in r.iter_range(0, r.plaintext_size - 1))
    finally:
        os.close(fd)


def reader(path: Path, ring: Keyring = RING) -> SegmentReader:
    fd = os.open(path, os.O_RDONLY)
    return SegmentReader(fd, ring)  # the test's tmp_path goes away; the fd with the process


def patch_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(raw)


def segment_offset(i: int, size: int = S) -> int:
    return HEADER_SIZE + i * (size + OVERHEAD)


@pytest.mark.parametrize("n", [0, 1, S - 1, S, S + 1, 3 * S, 3 * S + 7])
@pytest.mark.parametrize("chunk", [None, 1000, S])
def test_round_trip_small_segments(tmp_path, n, chunk) -> None:
    data = os.urandom(n)
    write(tmp_path / "f", data, chunk=chunk)
    assert read(tmp_path / "f") == data


@pytest.mark.parametrize("n", [0, 1, DEFAULT_SEGMENT_SIZE - 1, DEFAULT_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE + 1,
                               3 * DEFAULT_SEGMENT_SIZE, 3 * DEFAULT_SEGMENT_SIZE + 7])
def test_round_trip_default_segments(tmp_path, n) -> None:
    data = os.urandom(n)
    write(tmp_path / "f", data, size=DEFAULT_SEGMENT_SIZE, chunk=256 * 1024 + 3)
    assert read(tmp_path / "f") == data
    assert reader(tmp_path / "f").segment_size == DEFAULT_SEGMENT_SIZE


def test_byte_by_byte_writes(tmp_path) -> None:
    data = os.urandom(S + 10)
    write(tmp_path / "f", data, chunk=1)
    assert read(tmp_path / "f") == data


def test_layout_arithmetic() -> None:
    for n in [0, 1, S - 1, S, S + 1, 3 * S, 3 * S + 7, 10 * S - 1]:
        count = max(1, -(-n // S))
        assert segment_layout(encrypted_size(n, S), S) == (count, n)
    assert encrypted_size(0, S) == HEADER_SIZE + OVERHEAD
    assert encrypted_size(S, S) == HEADER_SIZE + S + OVERHEAD  # no extra empty segment
    for bad in [0, HEADER_SIZE, HEADER_SIZE + OVERHEAD - 1, HEADER_SIZE + S + OVERHEAD + 5,
                HEADER_SIZE + S + 2 * OVERHEAD]:
        with pytest.raises(CorruptFile):
            segment_layout(bad, S)


def test_header_fields() -> None:
    raw = build_header("key-2024.a_b", S, b"\x07" * 16)
    assert len(raw) == HEADER_SIZE and raw[:8] == b"HMFSAEAD" and raw[8] == 1 and raw[9] == 12
    assert raw[10:22] == b"key-2024.a_b" and raw[22:42] == bytes(20)
    assert raw[42:46] == S.to_bytes(4, "big") and raw[46:62] == b"\x07" * 16 and raw[62:] == b"\0\0"
    h = parse_header(raw)
    assert (h.key_id, h.segment_size, h.file_id, h.raw) == ("key-2024.a_b", S, b"\x07" * 16, raw)
    for bad_size in [S - 1, 16 * 2**20 + 1]:
        with pytest.raises(ValueError):
            build_header("k1", bad_size, bytes(16))
    with pytest.raises(ValueError):
        SegmentWriter(None, RING, 1000)  # type: ignore[arg-type]


def test_only_ciphertext_on_disk(tmp_path) -> None:
    pattern = (b"RECOGNISABLE-PLAINTEXT-" * 50)[:1024]
    write(tmp_path / "f", pattern * 20)
    raw = (tmp_path / "f").read_bytes()
    for i in range(0, len(pattern) - 16, 16):
        assert pattern[i:i + 16] not in raw
    assert K1 not in raw
    assert read(tmp_path / "f") == pattern * 20


def test_every_range_at_segment_boundaries(tmp_path) -> None:
    data = os.urandom(3 * S + 7)
    write(tmp_path / "f", data)
    r = reader(tmp_path / "f")
    points = sorted({p for b in (0, S, 2 * S, 3 * S) for p in (b - 1, b, b + 1) if 0 <= p < len(data)}
                    | {len(data) - 1})
    buf = bytearray(S + OVERHEAD)
    for first in points:
        for last in points:
            if first <= last:
                got = b"".join(bytes(p) for p in r.iter_range(first, last, buf))
                assert got == data[first:last + 1], (first, last)
    assert all(piece.obj is buf for piece in r.iter_range(0, len(data) - 1, buf))  # no copies: views of buf
    for first, last in [(-1, 5), (5, 4), (0, len(data))]:
        with pytest.raises(ValueError):
            r.iter_range(first, last)
    with pytest.raises(ValueError):
        r.iter_range(0, 1, bytearray(S))


def test_read_ahead_gives_the_same_bytes_and_stops_at_tampering(tmp_path) -> None:
    """iter_range_ahead (the next segment decrypted in a pool thread) is iter_range's twin."""
    data = os.urandom(3 * S + 7)
    write(tmp_path / "f", data)
    r = reader(tmp_path / "f")
    points = [0, S - 1, S, 2 * S + 1, len(data) - 1]
    for first in points:
        for last in points:
            if first <= last:
                assert b"".join(bytes(p) for p in r.iter_range_ahead(first, last)) == data[first:last + 1]
    with pytest.raises(ValueError):
        r.iter_range_ahead(5, 4)
    patch_byte(tmp_path / "f", segment_offset(2) + 20)
    got = []
    with pytest.raises(TamperedError) as e:
        for piece in reader(tmp_path / "f").iter_range_ahead(0, len(data) - 1):
            got.append(bytes(piece))
    assert e.value.segment == 2 and b"".join(got) == data[:2 * S]  # nothing of the bad segment


def test_read_ahead_closed_early_leaves_no_read_in_flight(tmp_path, monkeypatch) -> None:
    """Closing the iterator waits for the segment being read ahead, so the caller may close the fd."""
    data = os.urandom(3 * S)
    write(tmp_path / "f", data)
    r = reader(tmp_path / "f")
    opened = []
    real = r._open

    def slow_open(index, view):
        time.sleep(0.2)
        opened.append(index)
        return real(index, view)

    monkeypatch.setattr(r, "_open", slow_open)
    it = r.iter_range_ahead(0, len(data) - 1)
    assert bytes(next(it)) == data[:S]  # segment 1 is now being read ahead
    it.close()
    assert opened == [0, 1]  # finished before close returned, and nothing after


def test_writer_seals_ahead_in_order_and_abort_waits(tmp_path) -> None:
    data = os.urandom(5 * S + 3)
    write(tmp_path / "f", data, chunk=S // 3)  # hand-offs land at every segment boundary
    assert read(tmp_path / "f") == data
    with open(tmp_path / "g", "wb", buffering=0) as f:
        w = SegmentWriter(f, RING, S)
        w.write(os.urandom(2 * S + 1))  # one seal in flight
        w.abort()
        size = f.tell()
    assert size == HEADER_SIZE + 2 * (S + OVERHEAD)  # header and the two sealed segments, then nothing
    with pytest.raises(ValueError):
        w.write(b"x")


def test_a_range_decrypts_only_its_segments(tmp_path, monkeypatch) -> None:
    data = os.urandom(3 * S + 7)
    write(tmp_path / "f", data)
    r = reader(tmp_path / "f")
    cipher = RING.cipher("k1")
    real = cipher.decrypt_into
    calls = []
    monkeypatch.setattr(cipher, "decrypt_into", lambda *a: calls.append(1) or real(*a))
    assert b"".join(bytes(p) for p in r.iter_range(S + 5, S + 10)) == data[S + 5:S + 11]
    assert len(calls) == 1
    assert b"".join(bytes(p) for p in r.iter_range(S - 1, 2 * S)) == data[S - 1:2 * S + 1]
    assert len(calls) == 4  # segments 0, 1, 2


def test_a_damaged_far_segment_does_not_stop_a_near_range(tmp_path) -> None:
    data = os.urandom(3 * S + 7)
    write(tmp_path / "f", data)
    patch_byte(tmp_path / "f", segment_offset(3) + 20)
    r = reader(tmp_path / "f")
    assert b"".join(bytes(p) for p in r.iter_range(0, 3 * S - 1)) == data[:3 * S]
    with pytest.raises(TamperedError) as e:
        list(r.iter_range(3 * S, 3 * S))
    assert e.value.segment == 3
    with pytest.raises(TamperedError):
        r.verify_all()


def _expect_tampered(path: Path, segment: int) -> None:
    with pytest.raises(TamperedError) as e:
        read(path)
    assert e.value.segment == segment


@pytest.mark.parametrize("segment, within, what", [
    (0, 0, "nonce"), (1, 11, "nonce"), (1, 12, "ciphertext"), (2, 12 + S // 2, "ciphertext"),
    (3, 12 + 6, "ciphertext"), (0, 12 + S, "tag"), (3, 12 + 7 + 15, "tag")])
def test_flipped_segment_byte(tmp_path, segment, within, what) -> None:
    write(tmp_path / "f", os.urandom(3 * S + 7))
    patch_byte(tmp_path / "f", segment_offset(segment) + within)
    _expect_tampered(tmp_path / "f", segment)


@pytest.mark.parametrize("offset, error", [
    (0, CorruptFile), (7, CorruptFile), (8, CorruptFile), (9, CorruptFile), (10, UnknownKey),
    (11, UnknownKey), (12, CorruptFile), (41, CorruptFile), (42, CorruptFile), (44, EncryptedFileError),
    (45, EncryptedFileError), (46, TamperedError), (61, TamperedError), (62, CorruptFile), (63, CorruptFile)])
def test_flipped_header_byte(tmp_path, offset, error) -> None:
    write(tmp_path / "f", os.urandom(3 * S + 7))
    patch_byte(tmp_path / "f", offset)
    with pytest.raises(error):
        read(tmp_path / "f")


def test_truncation(tmp_path) -> None:
    f = tmp_path / "f"
    for n, cut, segment in [(3 * S + 7, 1, 3), (3 * S, 1, 2), (3 * S, S + OVERHEAD, 1), (3 * S + 7, 7 + OVERHEAD, 2),
                            (3 * S + 7, S + OVERHEAD, 2), (S + 1, 1 + OVERHEAD, 0)]:
        write(f, os.urandom(n))
        os.truncate(f, f.stat().st_size - cut)
        _expect_tampered(f, segment)
    for n in [0, 1, 3 * S]:
        write(f, os.urandom(n))
        for size in [HEADER_SIZE, HEADER_SIZE + OVERHEAD - 1, 10, 0]:
            os.truncate(f, size)
            with pytest.raises(CorruptFile):
                read(f)


def test_extension(tmp_path) -> None:
    f = tmp_path / "f"
    write(f, os.urandom(3 * S))
    raw = f.read_bytes()
    f.write_bytes(raw + raw[segment_offset(1):segment_offset(2)])  # a genuine segment appended
    _expect_tampered(f, 2)  # the old final segment is no longer last
    f.write_bytes(raw + raw[segment_offset(2):])  # the final segment, twice
    _expect_tampered(f, 2)
    f.write_bytes(raw + bytes(OVERHEAD))  # an empty segment: never written
    with pytest.raises(CorruptFile):
        read(f)
    write(f, os.urandom(3 * S + 7))
    f.write_bytes(f.read_bytes() + b"x")
    _expect_tampered(f, 3)


def test_swapped_segments(tmp_path) -> None:
    f = tmp_path / "f"
    write(f, os.urandom(3 * S + 7))
    raw = f.read_bytes()
    s0, s1, rest = raw[segment_offset(0):segment_offset(1)], raw[segment_offset(1):segment_offset(2)], \
        raw[segment_offset(2):]
    f.write_bytes(raw[:HEADER_SIZE] + s1 + s0 + rest)
    _expect_tampered(f, 0)


def test_splice_from_another_file_with_the_same_key(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    data = os.urandom(3 * S + 7)
    write(a, data)
    write(b, data)
    ra, rb = a.read_bytes(), b.read_bytes()
    assert ra != rb  # fresh file id and nonces every time
    a.write_bytes(ra[:segment_offset(1)] + rb[segment_offset(1):segment_offset(2)] + ra[segment_offset(2):])
    _expect_tampered(a, 1)
    a.write_bytes(rb[:HEADER_SIZE] + ra[HEADER_SIZE:])  # b's header on a's segments
    _expect_tampered(a, 0)


def test_wrong_key_with_the_same_id(tmp_path) -> None:
    write(tmp_path / "f", os.urandom(2 * S))
    with pytest.raises(TamperedError) as e:
        read(tmp_path / "f", Keyring([("k1", K2)]))
    assert e.value.segment == 0


def test_unknown_key_id(tmp_path) -> None:
    write(tmp_path / "f", b"secret")
    with pytest.raises(UnknownKey) as e:
        read(tmp_path / "f", Keyring([("k9", K1)]))
    assert e.value.key_id == "k1"
    with pytest.raises(UnknownKey):
        RING.cipher("nope")


def test_key_rotation(tmp_path) -> None:
    old, new = Keyring([("k1", K1)]), Keyring([("k2", K2), ("k1", K1)])
    write(tmp_path / "old", b"written before the rotation", old)
    assert read(tmp_path / "old", new) == b"written before the rotation"
    assert reader(tmp_path / "old", new).key_id == "k1"
    write(tmp_path / "new", b"written after", new)
    assert reader(tmp_path / "new", new).key_id == "k2"
    assert read(tmp_path / "new", new) == b"written after"
    with pytest.raises(UnknownKey):
        read(tmp_path / "new", old)


def test_writer_misuse(tmp_path) -> None:
    with open(tmp_path / "f", "wb", buffering=0) as f:
        w = SegmentWriter(f, RING, S)
        w.write(b"abc")
        assert w.finish() == 3
        with pytest.raises(ValueError):
            w.write(b"more")
        with pytest.raises(ValueError):
            w.finish()


# -- keyfiles --

HEX1 = K1.hex()
B64_2 = base64.b64encode(K2).decode()


def test_keyfile_hex_base64_comments() -> None:
    ring = parse_keyfile(f"# keys for hmacfs\n\n  2024-b {HEX1.upper()}   # current\nold.key_1\t{B64_2}\n#k3 x\n")
    assert ring.current_id == "2024-b" and ring.ids == ("2024-b", "old.key_1")
    assert "old.key_1" in ring and "k3" not in ring
    assert ring.cipher("2024-b") is ring.cipher("2024-b")
    assert ring.cipher("old.key_1").decrypt(bytes(12), Keyring([("x", K2)]).cipher("x").encrypt(bytes(12), b"hi")) \
        == b"hi"
    assert HEX1 not in repr(ring) and B64_2 not in repr(ring) and "2024-b" in repr(ring)
    assert ring.warnings == []


@pytest.mark.parametrize("text, line, words", [
    (f"k1 {HEX1}\nk1 {HEX1}\n", 2, "duplicate key id 'k1' (first on line 1)"),
    (f"k1 {HEX1[:-2]}\n", 1, "64 digits, this one is 62"),
    (f"# c\nk1 {HEX1}00\n", 2, "64 digits"),
    (f"k1 {base64.b64encode(K1[:16]).decode()}\n", 1, "16 bytes, 32 needed"),
    (f"k1 {B64_2[:-3]}\n", 1, "neither 64 hex digits nor valid base64"),
    (f"k1 {B64_2.replace('A', '-')}!\n", 1, "neither"),
    (f"k1\n{HEX1}\n", 1, "found 1 field"),
    (f"k1 {HEX1} extra\n", 1, "found 3 field"),
    (f"{HEX1} k1\n", 1, "key id is 1 to 32"),
    (f"{'k' * 33} {HEX1}\n", 1, "key id is 1 to 32"),
    (f"k/1 {HEX1}\n", 1, "key id is 1 to 32"),
])
def test_keyfile_errors(text, line, words) -> None:
    with pytest.raises(KeyfileError) as e:
        parse_keyfile(text)
    message = str(e.value)
    assert f"line {line}:" in message and words in message
    for secret in (HEX1, HEX1[:-2], HEX1[:32], B64_2, B64_2[:-3], base64.b64encode(K1[:16]).decode()):
        assert secret not in message
    assert isinstance(e.value, StartupError)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # another\n"])
def test_keyfile_without_keys(text) -> None:
    with pytest.raises(KeyfileError, match="no key"):
        parse_keyfile(text)


def test_load_keyfile(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k1 {HEX1}\n")
    path.chmod(0o600)
    ring = load_keyfile(str(path))
    assert ring.current_id == "k1" and ring.warnings == []
    path.chmod(0o640)
    ring = load_keyfile(str(path))
    assert len(ring.warnings) == 1 and "640" in ring.warnings[0] and str(path) in ring.warnings[0]
    path.write_text(f"\nk1 {HEX1[:10]}\n")
    with pytest.raises(KeyfileError, match=r"keys'?: line 2:") as e:
        load_keyfile(str(path))
    assert HEX1[:10] not in str(e.value)
    with pytest.raises(KeyfileError, match=r"cannot read keyfile .*missing"):
        load_keyfile(str(tmp_path / "missing"))
    path.write_bytes(b"k1 \xff\xfe\n")
    with pytest.raises(KeyfileError, match="UTF-8"):
        load_keyfile(str(path))


def test_the_pipeline_knows_the_format_magic() -> None:
    """pipeline.py recognises encrypted files without importing this module (it loads only
    when encryption is on): its copy of the magic must not drift."""
    from hmacfs import pipeline
    from hmacfs.storage.encrypted import MAGIC

    assert pipeline.ENCRYPTED_MAGIC == MAGIC
