"""A small ISO 9660 reader: which files an image holds, and where each one's bytes are.

Strategy: packed files are served straight from their image (no mount, no root), so hmacfs
only needs each file's extent, its byte offset and length inside the image. This module
parses the primary volume descriptor (ECMA-119 8.4), walks the directory records
(ECMA-119 9.1) and reads the Rock Ridge names (IEEE P1282 NM entries, with SUSP CE
continuation areas, IEEE P1281) that carry the real names in the image's charset; without
Rock Ridge the ISO 9660 identifier (`NAME.EXT;1`) is used. Pure reads through `os.pread`
on an fd: the same code lists, verifies and locates files. Multi-extent files (ISO level
3, a file of 4 GiB or more) are refused: the packer never writes them.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

SECTOR = 2048
FIRST_DESCRIPTOR = 16          # sectors 0-15 are the system area
MAX_DESCRIPTORS = 64           # a real image has a handful; a hostile one must not loop forever
MAX_DIRECTORY_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
FLAG_DIRECTORY = 0x02
FLAG_MULTI_EXTENT = 0x80


class IsoError(ValueError):
    """The bytes are not an ISO 9660 image this reader understands."""


@dataclass(frozen=True)
class IsoEntry:
    """One regular file in an image: its path (Rock Ridge name when present) and its bytes."""

    path: str
    offset: int    # byte offset of the file's first byte in the image
    size: int


@dataclass(frozen=True)
class _Record:
    name: bytes
    extent: int
    size: int
    flags: int
    system_use: bytes


def read_entries(fd: int, charset: str = "utf-8") -> list[IsoEntry]:
    """Every regular file of the image open at `fd`, in directory order."""
    return list(_walk(fd, charset))


def _pvd_root(fd: int) -> tuple[_Record, int]:
    """The root directory record and the logical block size, from the primary volume descriptor."""
    for index in range(FIRST_DESCRIPTOR, FIRST_DESCRIPTOR + MAX_DESCRIPTORS):
        block = os.pread(fd, SECTOR, index * SECTOR)
        if len(block) < SECTOR or block[1:6] != b"CD001":
            raise IsoError("no ISO 9660 volume descriptor (not an ISO image, or truncated)")
        if block[0] == 255:
            break
        if block[0] == 1:
            block_size = struct.unpack_from("<H", block, 128)[0]
            if block_size not in (512, 1024, 2048):
                raise IsoError(f"unsupported logical block size {block_size}")
            root = _parse_record(block[156:156 + 34])
            if root is None:
                raise IsoError("the primary volume descriptor has no root directory record")
            return root, block_size
    raise IsoError("no primary volume descriptor")


def _parse_record(data: bytes) -> Optional[_Record]:
    length = data[0] if data else 0
    if length < 34 or length > len(data):
        return None
    extent, size = struct.unpack_from("<I", data, 2)[0], struct.unpack_from("<I", data, 10)[0]
    name_len = data[32]
    if 33 + name_len > length:
        raise IsoError("a directory record's name runs past its end")
    name = data[33:33 + name_len]
    use_start = 33 + name_len + (1 - name_len % 2)  # the identifier is padded to an even length
    return _Record(name, extent, size, data[25], data[use_start:length])


def _directory(fd: int, record: _Record, block_size: int) -> Iterator[_Record]:
    """The records of one directory; records never cross a sector (ECMA-119 6.8.1.1)."""
    if record.size > MAX_DIRECTORY_BYTES:
        raise IsoError("a directory is implausibly large")
    data = os.pread(fd, record.size, record.extent * block_size)
    if len(data) < record.size:
        raise IsoError("a directory extent lies past the end of the image")
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding to the next sector
            pos = (pos // SECTOR + 1) * SECTOR
            continue
        parsed = _parse_record(data[pos:pos + data[pos]])
        if parsed is None:
            raise IsoError("a directory record is damaged")
        pos += data[pos]
        if parsed.name not in (b"\x00", b"\x01"):  # '.' and '..'
            yield parsed


def _walk(fd: int, charset: str) -> Iterator[IsoEntry]:
    root, block_size = _pvd_root(fd)
    image_size = os.fstat(fd).st_size
    stack: list[tuple[_Record, str, int]] = [(root, "", 0)]
    seen: set[int] = set()
    while stack:
        directory, prefix, depth = stack.pop()
        if directory.extent in seen or depth > MAX_DEPTH:
            raise IsoError("the directory tree loops or is too deep")
        seen.add(directory.extent)
        children = []
        for record in _directory(fd, directory, block_size):
            name = _name(fd, record, block_size, charset)
            if not name or name in (".", "..") or "/" in name or "\x00" in name:
                raise IsoError(f"an unusable file name in the image: {name!r}")
            path = prefix + name
            if record.flags & FLAG_DIRECTORY:
                children.append((record, path + "/", depth + 1))
            elif record.flags & FLAG_MULTI_EXTENT:
                raise IsoError(f"{path!r} spans several extents (4 GiB or more): not supported")
            else:
                offset = record.extent * block_size
                if offset + record.size > image_size:
                    raise IsoError(f"{path!r} lies past the end of the image")
                yield IsoEntry(path, offset, record.size)
        stack.extend(reversed(children))


def _name(fd: int, record: _Record, block_size: int, charset: str) -> str:
    """The Rock Ridge name (NM entries, following CE continuations), else the ISO identifier."""
    parts: list[bytes] = []
    found = False
    area, hops = record.system_use, 0
    while area:
        next_area = b""
        pos = 0
        while pos + 4 <= len(area):
            sig, length = area[pos:pos + 2], area[pos + 2]
            if length < 4 or pos + length > len(area):
                break
            body = area[pos + 4:pos + length]
            if sig == b"NM" and body:
                found = True
                if not body[0] & 0x06:  # not '.' / '..'
                    parts.append(body[1:])
            elif sig == b"CE" and len(body) >= 24:
                block, offset, size = (struct.unpack_from("<I", body, i)[0] for i in (0, 8, 16))
                hops += 1
                if hops > 16 or size > SECTOR:
                    raise IsoError("Rock Ridge continuation areas loop or are too large")
                next_area = os.pread(fd, size, block * block_size + offset)
            elif sig == b"ST":
                break
            pos += length
        area = next_area
    if found:
        return b"".join(parts).decode(charset, errors="surrogateescape")
    name = record.name.decode("ascii", errors="replace")
    name = name.split(";", 1)[0]
    return name[:-1] if name.endswith(".") else name
