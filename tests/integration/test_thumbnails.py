"""Thumbnails against the real process and the real ImageMagick.

The dimensions of every thumbnail are read from its own file header (PNG IHDR, JPEG SOF),
not from ImageMagick, so a test would catch a thumbnail that is merely labelled right.
Uploads never wait for a thumbnail, so every check polls `?thumbnail` until it appears.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import pytest

from tests.integration.test_encryption import keyfile
from tests.support.client import put, request, signed_put, signed_v3, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.xmpp.httpraw import png

CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
WAIT = 30.0  # seconds a thumbnail may take to appear (one worker, a shared CPU)


def _real_imagemagick() -> bool:
    convert = shutil.which("magick") or shutil.which("convert")
    if not convert:
        return False
    out = subprocess.run([convert, "-version"], capture_output=True, text=True, check=False).stdout
    return "ImageMagick" in out


pytestmark = pytest.mark.skipif(not _real_imagemagick(),
                                reason="ImageMagick (Debian: imagemagick) is not installed")


# --- images and their headers ---------------------------------------------------------------------

def image(fmt: str, width: int, height: int) -> bytes:
    """A real picture in `fmt` (png, jpeg, gif, webp), converted from a PNG by ImageMagick."""
    source = png(width, height, seed=width * 7 + height)
    if fmt == "png":
        return source
    convert = shutil.which("magick") or shutil.which("convert")
    assert convert
    return subprocess.run([convert, "png:-", f"{fmt}:-"], input=source, capture_output=True, check=True).stdout


def dimensions(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the file header: PNG IHDR or a JPEG SOFn segment."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        assert data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    assert data[:2] == b"\xff\xd8", data[:16]
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return "jpeg", width, height
        i += 2 + length
    raise AssertionError("no SOF segment in the JPEG")


def bomb_png(side: int = 50000) -> bytes:
    """A decompression bomb: a PNG declaring side x side RGB pixels (7.5 GB decoded) in a few KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 3)
    rows = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


# --- the server -----------------------------------------------------------------------------------

THUMBS = {"thumbnails": {"enabled": True, "size": "200x200", "thumbnailintervalscan": "1h"},
          "uploads": {"maxuploadsize": "20MB", "allowedextensions": []},
          "security": {"deletesecret": "del-secret"}}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("thumbs"), THUMBS).start()
    yield proc
    proc.close()


def thumbnail(srv, path: str, method: str = "GET", headers: dict | None = None):
    return request(srv.port, method, url_path(srv.prefix, path) + "?thumbnail", headers=headers)


def wait_thumbnail(srv, path: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        r = thumbnail(srv, path)
        if r.status == 200:
            return r
        assert r.status == 404, r
        assert time.monotonic() < deadline, f"no thumbnail for {path} after {timeout}s:\n{srv.log()[-3000:]}"
        time.sleep(0.1)


def counter(srv, result: str) -> float:
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    sample = f'hmacfs_thumbnails_total{{result="{result}"}} '
    return next((float(line[len(sample):]) for line in text.splitlines() if line.startswith(sample)), 0.0)


def thumbnail_files(srv) -> list[Path]:
    return sorted(p for p in (srv.storage / ".hmacfs" / "thumbnails").rglob("*") if p.is_file())


def assert_fits(got: tuple[str, int, int], fmt: str, width: int, height: int, box: int = 200) -> None:
    """Within `box` on both sides, the long side filling it, the aspect ratio kept (to a pixel)."""
    kind, w, h = got
    assert kind == fmt
    scale = min(box / width, box / height, 1.0)
    assert max(w, h) == round(max(width, height) * scale)
    assert abs(w - width * scale) <= 1 and abs(h - height * scale) <= 1


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, ctype, width, height, thumb_fmt", [
    ("png", "image/png", 640, 320, "png"),
    ("jpeg", "image/jpeg", 300, 600, "jpeg"),
    ("gif", "image/gif", 500, 100, "png"),
    ("webp", "image/webp", 400, 400, "png"),
    ("png", "application/octet-stream", 50, 40, "png"),  # untyped, named .png; small: never enlarged
])
def test_thumbnail_fits_size_and_keeps_aspect(srv, fmt, ctype, width, height, thumb_fmt) -> None:
    path = f"{uuid.uuid4()}/picture.{'png' if ctype == 'application/octet-stream' else fmt}"
    data = image(fmt, width, height)
    assert put(srv, path, data, content_type=ctype).status == 201
    r = wait_thumbnail(srv, path)
    assert_fits(dimensions(r.body), thumb_fmt, width, height)
    assert r.header("Content-Type") == f"image/{thumb_fmt}"
    assert r.header("Content-Length") == str(len(r.body))
    assert r.header("X-Content-Type-Options") == "nosniff" and r.header("Content-Security-Policy") == CSP
    head = thumbnail(srv, path, "HEAD")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(len(r.body))
    assert thumbnail(srv, path, headers={"If-None-Match": r.header("ETag")}).status == 304
    part = thumbnail(srv, path, headers={"Range": "bytes=0-3"})
    assert part.status == 206 and part.body == r.body[:4]
    assert request(srv.port, "GET", url_path(srv.prefix, path)).body == data  # the file itself is untouched


def test_tus_upload_gets_a_thumbnail(srv) -> None:
    """The pipeline's after-commit seam: a resumable upload is thumbnailed like a PUT."""
    path = f"{uuid.uuid4()}/via-tus.png"
    data = png(500, 250)
    tus = {"Tus-Resumable": "1.0.0"}
    r = request(srv.port, "POST", signed_put(srv.prefix, srv.secret, path, len(data)), None,
                {**tus, "Upload-Length": str(len(data))})
    assert r.status == 201, r
    loc, half = r.header("Location"), len(data) // 2
    for start, chunk in ((0, data[:half]), (half, data[half:])):
        r = request(srv.port, "PATCH", loc, chunk,
                    {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(start)})
        assert r.status == 204, r
    assert_fits(dimensions(wait_thumbnail(srv, path).body), "png", 500, 250)


def test_svg_text_and_impostors_get_none(srv) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"><rect width="9" height="9"/></svg>'
    nones = {
        f"{uuid.uuid4()}/drawing.svg": (svg, "image/svg+xml"),
        f"{uuid.uuid4()}/notes.txt": (b"just text\n" * 50, "text/plain"),
        f"{uuid.uuid4()}/fake.png": (b"not a png at all" * 10, "image/png"),  # type says image, bytes do not
        f"{uuid.uuid4()}/hidden.txt": (png(300, 300), "text/plain"),  # a PNG declared as text: left alone
    }
    for path, (data, ctype) in nones.items():
        assert put(srv, path, data, content_type=ctype).status == 201
    control = f"{uuid.uuid4()}/control.png"  # one worker, in order: once this is made, the rest were seen
    assert put(srv, control, png(300, 300), content_type="image/png").status == 201
    wait_thumbnail(srv, control)
    for path in nones:
        assert thumbnail(srv, path).status == 404
    assert request(srv.port, "GET", url_path(srv.prefix, f"{uuid.uuid4()}/none.png") + "?thumbnail").status == 404


@pytest.mark.parametrize("side", [50000, 16000])  # past the width limit; within it but past area and disk
def test_decompression_bomb_fails_the_thumbnail_not_the_upload(srv, side) -> None:
    failed, made = counter(srv, "failed"), counter(srv, "made")
    bomb = f"{uuid.uuid4()}/bomb.png"
    data = bomb_png(side)
    assert len(data) < 100_000
    started = time.monotonic()
    assert put(srv, bomb, data, content_type="image/png").status == 201
    while counter(srv, "failed") < failed + 1:
        assert time.monotonic() - started < WAIT, srv.log()[-3000:]
        time.sleep(0.1)
    assert thumbnail(srv, bomb).status == 404 and counter(srv, "made") == made
    assert srv.healthy() and srv.proc.poll() is None
    assert request(srv.port, "GET", url_path(srv.prefix, bomb)).body == data  # the upload itself is intact
    assert "thumbnail of" in srv.log() and "bomb.png" in srv.log()
    after = f"{uuid.uuid4()}/after.png"
    assert put(srv, after, png(120, 90), content_type="image/png").status == 201
    assert_fits(dimensions(wait_thumbnail(srv, after).body), "png", 120, 90)


def test_thumbnail_goes_with_a_deleted_file(srv) -> None:
    path = f"{uuid.uuid4()}/deleted.png"
    assert put(srv, path, png(400, 300), content_type="image/png").status == 201
    body = wait_thumbnail(srv, path).body
    files = [p for p in thumbnail_files(srv) if p.read_bytes() == body]
    assert len(files) == 1
    exp = int(time.time()) + 60
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", exp)).status == 204
    assert not files[0].exists()
    assert thumbnail(srv, path).status == 404


def test_thumbnail_goes_when_the_file_expires(hmacfs_factory) -> None:
    proc = hmacfs_factory({**THUMBS, "server": {"filettlenabled": True, "filettl": "4s", "cleanupinterval": "1s"}})
    path = f"{uuid.uuid4()}/expiring.png"
    assert put(proc, path, png(300, 200), content_type="image/png").status == 201
    wait_thumbnail(proc, path)
    assert len(thumbnail_files(proc)) == 1
    deadline = time.monotonic() + 20
    while thumbnail_files(proc):  # the janitor removes the expired file, and its thumbnail with it
        assert time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.2)
    assert request(proc.port, "GET", url_path(proc.prefix, path)).status == 404


def test_periodic_scan_fills_gaps(tmp_path: Path) -> None:
    """Images stored while thumbnails were off get one once they are on, from the scan alone."""
    workdir = tmp_path / "scan"
    off = HmacfsProcess(workdir, {"uploads": {"allowedextensions": []}}).start()
    try:
        path = f"{uuid.uuid4()}/old.png"
        assert put(off, path, png(600, 200), content_type="image/png").status == 201
        assert thumbnail(off, path).status == 404
    finally:
        off.close()
    on = HmacfsProcess(workdir, {**THUMBS, "thumbnails": {**THUMBS["thumbnails"], "thumbnailintervalscan": "2s"}})
    on.start()
    try:
        assert_fits(dimensions(wait_thumbnail(on, path).body), "png", 600, 200)
        assert "thumbnail scan: 1 image(s) queued" in on.log()
        orphan = on.storage / ".hmacfs" / "thumbnails" / "ab" / ("ab" + "0" * 62 + ".png")
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(png(10, 10))  # a thumbnail whose file went while no server ran
        os.utime(orphan, (time.time() - 600, time.time() - 600))
        deadline = time.monotonic() + 15
        while orphan.exists():
            assert time.monotonic() < deadline, on.log()[-3000:]
            time.sleep(0.2)
        assert thumbnail(on, path).status == 200
    finally:
        on.close()


def test_encrypted_store_thumbnail_is_made_encrypted_and_served(hmacfs_factory, tmp_path: Path) -> None:
    keys = keyfile(tmp_path, f"k1 {'11' * 32}\n")
    proc = hmacfs_factory({**THUMBS, "encryption": {"enabled": True, "keyfile": keys}})
    path = f"{uuid.uuid4()}/secret.jpg"
    assert put(proc, path, image("jpeg", 800, 400), content_type="image/jpeg").status == 201
    assert (proc.storage / path).read_bytes()[:8] == b"HMFSAEAD"
    r = wait_thumbnail(proc, path)
    assert_fits(dimensions(r.body), "jpeg", 800, 400)
    [stored] = thumbnail_files(proc)
    assert stored.read_bytes()[:8] == b"HMFSAEAD" and r.body[16:48] not in stored.read_bytes()
    assert not [p for p in (proc.storage / ".hmacfs" / "tmp").rglob("*") if p.is_file()]  # no plaintext left
