"""ISO containers: `hmacfs iso pack|list|verify` beside the running server, and downloads after.

Why these tests look the way they do: the promise is that a packed file is still the same
file at the same URL. So files go in through signed PUTs, the real CLI packs them with the
real genisoimage (and xorriso), and the real server must then send every byte as before,
whole, by Range and on HEAD; Debian's `isoinfo` reads the images independently of our
reader. The reader's unit tests run on an image built by genisoimage as well.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hmacfs.storage.iso9660 import IsoError, read_entries
from tests.support import toml_writer
from tests.support.client import put, request, signed_v3, url_path
from tests.support.hmacfs_proc import REPO, HmacfsProcess

pytestmark = pytest.mark.skipif(not (shutil.which("genisoimage") and shutil.which("isoinfo")),
                                reason="genisoimage/isoinfo not installed (apt install genisoimage)")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LONG = "ünïcødé \u2013 ☃ name with spaces " + "x" * 120 + ".bin"


def hmacfs(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmacfs", *args, "-config", str(config)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


def ok(config: Path, *args: str) -> subprocess.CompletedProcess:
    r = hmacfs(config, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def get(srv: HmacfsProcess, path: str, method: str = "GET", headers: dict | None = None):
    return request(srv.port, method, url_path(srv.prefix, path), headers=headers)


def isoinfo_files(image: str) -> set[str]:
    out = subprocess.run(["isoinfo", "-R", "-f", "-i", image], capture_output=True, timeout=60, check=True).stdout
    return {line[1:] for line in out.decode("utf-8").splitlines()}


def corpus() -> dict[str, bytes]:
    files = {"a/hello.txt": b"hello, iso\n", "a/empty.bin": b"", f"a/deep/er/{LONG}": os.urandom(2049),
             "a/deep/2047.bin": os.urandom(2047), "a/deep/2048.bin": os.urandom(2048),
             "a/big.bin": os.urandom(300 * 1024 + 7), "a/semi;1.txt": b"an ISO version suffix in the name"}
    return files


def test_pack_serve_list_verify_delete(hmacfs_factory) -> None:
    srv = hmacfs_factory({"iso": {"enabled": True}, "security": {"deletesecret": "del-secret"}})
    cfg = srv.config_path
    files = corpus()
    for path, data in files.items():
        assert put(srv, path, data).status == 201, path
    assert put(srv, "b/later.txt", b"not selected").status == 201
    before = {p: get(srv, p) for p in files}

    r = ok(cfg, "iso", "pack", "--prefix", "a/", "--json")
    report = json.loads(r.stdout)
    assert report["packed"] == len(files) and len(report["images"]) == 1, r.stderr
    image = report["images"][0]["image"]
    assert image.startswith(str(srv.storage / ".hmacfs" / "iso"))
    for path in files:  # moved out of the served tree
        assert not (srv.storage / path).exists(), path
    assert (srv.storage / "b/later.txt").exists()

    # every packed file byte-identical at its URL, with the same validators
    for path, data in files.items():
        r = get(srv, path)
        assert r.status == 200 and r.body == data, path
        assert r.header("ETag") == before[path].header("ETag")
        assert r.header("Last-Modified") == before[path].header("Last-Modified")
        assert r.header("Content-Length") == str(len(data))
    big = files["a/big.bin"]
    r = get(srv, "a/big.bin", headers={"Range": "bytes=1000-2999"})
    assert r.status == 206 and r.body == big[1000:3000]
    assert r.header("Content-Range") == f"bytes 1000-2999/{len(big)}"
    r = get(srv, "a/big.bin", headers={"Range": "bytes=-5"})
    assert r.status == 206 and r.body == big[-5:]
    r = get(srv, "a/big.bin", headers={"Range": "bytes=0-1,5-9"})
    assert r.status == 206 and big[0:2] in r.body and big[5:10] in r.body
    r = get(srv, "a/big.bin", "HEAD")
    assert r.status == 200 and r.body == b"" and r.header("Content-Length") == str(len(big))

    # isoinfo (Debian's reader) and our reader list the same files; `iso list` agrees
    assert isoinfo_files(image) >= set(files)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert {e.path for e in read_entries(fd)} == set(files)
    finally:
        os.close(fd)
    listed = json.loads(ok(cfg, "iso", "list", "--json").stdout)
    assert [i["image"] for i in listed] == [image]
    assert {f["path"]: f["size"] for f in listed[0]["files"]} == {p: len(d) for p, d in files.items()}
    text = ok(cfg, "iso", "list").stdout
    assert os.path.basename(image) in text and "a/hello.txt" in text
    assert "every packed file matches" in ok(cfg, "iso", "verify").stderr

    # a second pack finds nothing new; a signed DELETE of a packed file: 404 (bytes stay in the image)
    assert json.loads(ok(cfg, "iso", "pack", "--prefix", "a/", "--json").stdout)["packed"] == 0
    target = signed_v3(srv.prefix, srv.secret, "a/hello.txt", "DELETE", int(time.time()) + 60)
    assert request(srv.port, "DELETE", target).status in (200, 204)
    assert get(srv, "a/hello.txt").status == 404
    assert get(srv, "a/deep/2048.bin").body == files["a/deep/2048.bin"]

    # a pack interrupted after a row was committed, before its file left the tree: both copies
    # serve the same bytes, and the next pack removes the leftover
    leftover = srv.storage / "a/deep/2048.bin"
    leftover.parent.mkdir(parents=True, exist_ok=True)  # emptied directories went with their files
    leftover.write_bytes(files["a/deep/2048.bin"])
    mtime_ns = srv.sql("SELECT mtime_ns FROM files WHERE path = ?", "a/deep/2048.bin")[0][0]
    os.utime(leftover, ns=(mtime_ns, mtime_ns))
    assert get(srv, "a/deep/2048.bin").body == files["a/deep/2048.bin"]
    assert json.loads(ok(cfg, "iso", "pack", "--json").stdout)["tidied"] == 1
    assert not leftover.exists() and get(srv, "a/deep/2048.bin").body == files["a/deep/2048.bin"]

    # a corrupted image: verify names the file and fails
    victim = "a/deep/2047.bin"
    entry = next(f for f in listed[0]["files"] if f["path"] == victim)
    with open(image, "r+b") as f:
        f.seek(entry["offset"] + 10)
        f.write(bytes([files[victim][10] ^ 0xFF]))
    r = hmacfs(cfg, "iso", "verify")
    assert r.returncode == 1 and victim in r.stderr and "sha256 mismatch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_small_images_and_skips(hmacfs_factory, tmp_path: Path) -> None:
    images = tmp_path / "images"  # iso.mountpoint outside the store
    srv = hmacfs_factory({"iso": {"enabled": True, "size": "400KB", "mountpoint": str(images)}})
    cfg = srv.config_path
    files = {f"s/{i}.bin": os.urandom(90 * 1024 + i) for i in range(5)}
    for path, data in files.items():
        assert put(srv, path, data).status == 201
    assert put(srv, "s/huge.bin", os.urandom(500 * 1024)).status == 201
    # deduplicated files are skipped with a reason (their bytes are shared)
    dedup = hmacfs_factory({"iso": {"enabled": True}, "deduplication": {"enabled": True}})
    assert put(dedup, "d/one.txt", b"same").status == 201
    r = ok(dedup.config_path, "iso", "pack")
    assert "deduplicated" in r.stderr and "packed 0 file(s)" in r.stderr

    r = ok(cfg, "iso", "pack", "--older-than", "1h")  # nothing that old
    assert "packed 0 file(s)" in r.stderr
    assert "dry run: 5 file(s)" in ok(cfg, "iso", "pack", "--dry-run").stderr
    report = json.loads(ok(cfg, "iso", "pack", "--json").stdout)
    assert report["packed"] == 5 and len(report["images"]) >= 2
    assert {s["path"] for s in report["skipped"]} == {"s/huge.bin"}
    for image in report["images"]:
        assert os.path.getsize(image["image"]) <= 400 * 1024 and image["image"].startswith(str(images))
    for path, data in files.items():
        assert get(srv, path).body == data
    assert get(srv, "s/huge.bin").status == 200
    ok(cfg, "iso", "verify")


def test_pack_refuses_when_off_or_encrypted(hmacfs_factory) -> None:
    srv = hmacfs_factory()
    r = hmacfs(srv.config_path, "iso", "pack")
    assert r.returncode == 2 and "[iso] enabled" in r.stderr
    srv.config["iso"] = {"enabled": True}
    srv.config["encryption"] = {"enabled": True, "keyfile": "/nonexistent"}
    srv.config_path.write_text(toml_writer.dumps(srv.config))
    r = hmacfs(srv.config_path, "iso", "pack")
    assert r.returncode == 2 and "refusing to pack while [encryption] is on" in r.stderr, r.stderr


def test_names_in_another_charset(hmacfs_factory) -> None:
    """iso.charset = iso8859-1: names it can spell are written in it (isoinfo shows the Latin-1
    bytes), a name it cannot spell stays on disk with a reason."""
    srv = hmacfs_factory({"iso": {"enabled": True, "charset": "iso8859-1"}})
    files = {"l/ä.txt": b"latin", "l/\u2603.txt": b"snowman"}
    for path, data in files.items():
        assert put(srv, path, data).status == 201
    r = ok(srv.config_path, "iso", "pack", "--json")
    report = json.loads(r.stdout)
    assert report["packed"] == 1 and report["skipped"][0]["path"] == "l/\u2603.txt", r.stderr
    assert "iso.charset=iso8859-1" in report["skipped"][0]["reason"]
    out = subprocess.run(["isoinfo", "-R", "-f", "-i", report["images"][0]["image"]], capture_output=True,
                         check=True).stdout
    assert b"/l/\xe4.txt" in out.splitlines()
    for path, data in files.items():
        assert get(srv, path).body == data
    ok(srv.config_path, "iso", "verify")


@pytest.mark.skipif(not shutil.which("xorriso"), reason="xorriso not installed")
def test_xorriso_images_serve_too(hmacfs_factory, monkeypatch) -> None:
    """The same pack through xorriso's mkisofs emulation (genisoimage hidden from PATH)."""
    srv = hmacfs_factory({"iso": {"enabled": True}})
    files = {"x/ä ö.txt": b"umlauts", "x/y/2048.bin": os.urandom(2048), "x/z.bin": b""}
    for path, data in files.items():
        assert put(srv, path, data).status == 201
    bindir = srv.workdir / "bin"
    bindir.mkdir()
    os.symlink(shutil.which("xorriso"), bindir / "xorriso")
    env = {**ENV, "PATH": str(bindir)}
    r = subprocess.run([sys.executable, "-m", "hmacfs", "iso", "pack", "--json", "-config", str(srv.config_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["packed"] == 3
    for path, data in files.items():
        assert get(srv, path).body == data


# -- the reader on its own -----------------------------------------------------------------------------

def build(tmp_path: Path, tree: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    for path, data in tree.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    out = tmp_path / "t.iso"
    subprocess.run(["genisoimage", "-quiet", "-R", "-D", "-iso-level", "3", "-input-charset", "utf-8",
                    "-output-charset", "utf-8", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def test_reader_finds_every_file_and_its_bytes(tmp_path: Path) -> None:
    tree = {"one.txt": b"1", "empty": b"", "d/" + LONG: os.urandom(4097),
            "a/b/c/d/e/f/g/h/i/j/deep.txt": b"nine levels down", "sector.bin": os.urandom(2048)}
    image = build(tmp_path, tree)
    fd = os.open(image, os.O_RDONLY)
    try:
        entries = {e.path: e for e in read_entries(fd)}
        assert set(entries) == set(tree)
        for path, data in tree.items():
            e = entries[path]
            assert e.size == len(data) and os.pread(fd, e.size, e.offset) == data
            assert e.offset % 2048 == 0
    finally:
        os.close(fd)
    # isoinfo -l reports the same files at the same extents (in sectors)
    assert isoinfo_extents(image) == {p: e.offset // 2048 for p, e in entries.items()}


def isoinfo_extents(image: Path) -> dict[str, int]:
    """path -> first sector of each regular file, from `isoinfo -R -l` (one listing per directory)."""
    out = subprocess.run(["isoinfo", "-R", "-l", "-i", str(image)], capture_output=True, check=True).stdout
    extents, directory = {}, ""
    for line in out.decode("utf-8").splitlines():
        if line.startswith("Directory listing of /"):
            directory = line[len("Directory listing of /"):]
            continue
        m = re.match(r"^-\S+.*\[\s*(\d+)\s+\d+\]\s\s(.*) $", line)
        if m:
            extents[directory + m.group(2)] = int(m.group(1))
    return extents


def test_reader_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(64 * 1024))
    short = tmp_path / "short"
    short.write_bytes(b"")
    for p in (junk, short):
        fd = os.open(p, os.O_RDONLY)
        try:
            with pytest.raises(IsoError):
                read_entries(fd)
        finally:
            os.close(fd)
    image = build(tmp_path, {"f.txt": b"x"})
    data = bytearray(image.read_bytes())
    data[16 * 2048 + 156 + 2:16 * 2048 + 156 + 6] = (10 ** 6).to_bytes(4, "little")  # root extent far away
    bad = tmp_path / "bad.iso"
    bad.write_bytes(bytes(data))
    fd = os.open(bad, os.O_RDONLY)
    try:
        with pytest.raises(IsoError):
            read_entries(fd)
    finally:
        os.close(fd)
    assert hashlib.sha256(image.read_bytes()).hexdigest()  # the original is untouched
