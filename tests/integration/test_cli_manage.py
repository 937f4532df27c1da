"""`hmacfs files list|delete`, `usage`, `reindex` and `rekey`, run as an operator runs them.

Why these tests look the way they do: the management verbs promise to work *while the
server runs*, through the same metadata and reference counts. So each test starts the real
server, uploads through signed URLs, runs the CLI as a separate process on the same config,
and then asks the running server (over HTTP) and the disk what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from hmacfs import auth
from hmacfs.http.httpmsg import guess_type
from tests.support import toml_writer
from tests.support.client import put, request, signed_v3, url_path
from tests.support.hmacfs_proc import REPO, HmacfsProcess

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MAGIC = b"HMFSAEAD"


def hmacfs(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m hmacfs ARGS -config FILE`, as a separate process."""
    return subprocess.run([sys.executable, "-m", "hmacfs", *args, "-config", str(config)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


def ok(config: Path, *args: str) -> subprocess.CompletedProcess:
    r = hmacfs(config, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def as_json(config: Path, *args: str):
    return json.loads(ok(config, *args, "--json").stdout)


def listed(config: Path, *args: str) -> set[str]:
    return {entry["path"] for entry in as_json(config, "files", "list", *args)}


def get(srv: HmacfsProcess, path: str, query: str = ""):
    return request(srv.port, "GET", url_path(srv.prefix, path) + query)


def blob_file(srv: HmacfsProcess, data: bytes) -> Path:
    """Where the blob of `data` is (named by its sha256, with `.enc` when stored encrypted)."""
    key = hashlib.sha256(data).hexdigest()
    if srv.config.get("encryption", {}).get("enabled"):
        key += ".enc"
    return srv.storage / ".hmacfs" / "blobs" / key[:2] / key[2:4] / key


def jwt_put(srv: HmacfsProcess, slot: str, filename: str, data: bytes, sub: str) -> int:
    claims = {"exp": int(time.time()) + 300, "slot": slot, "filename": filename, "filesize": len(data), "sub": sub}
    headers = {"Authorization": "Bearer " + auth.jwt_encode(srv.secret.encode(), claims)}
    return request(srv.port, "PUT", url_path(srv.prefix, f"{slot}/{filename}"), data, headers).status


# -- files list / delete and usage, beside a running server -------------------------------------------

def test_list_delete_and_usage_while_the_server_runs(hmacfs_factory) -> None:
    srv = hmacfs_factory({"deduplication": {"enabled": True}, "quotas": {"identity": "firstsegment"}})
    cfg = srv.config_path
    shared = b"the same bytes for alice and bob\n"
    files = {"alice/a1.txt": shared, "alice/docs/a2.bin": os.urandom(3000),
             "bob/b1.txt": shared, "bob/b2.jpg": os.urandom(5000)}
    for path, data in files.items():
        assert put(srv, path, data).status == 201
    slot = uuid.uuid4().hex
    carol = f"{slot}/c.txt"
    files[carol] = b"carol's file"
    assert jwt_put(srv, slot, "c.txt", files[carol], sub="carol@example.org") == 201  # the JWT sub wins
    everything = set(files)

    # list: by uploader (text columns and JSON), prefix, age
    text = ok(cfg, "files", "list", "--uploader", "alice").stdout.splitlines()
    assert text[0].split() == ["PATH", "SIZE", "UPLOADER", "CREATED", "EXPIRES"]
    assert {line.split()[0] for line in text[1:]} == {"alice/a1.txt", "alice/docs/a2.bin"}
    rows = as_json(cfg, "files", "list", "--uploader", "alice")
    assert {r["path"]: (r["size"], r["sha256"], r["uploader"]) for r in rows} == {
        p: (len(files[p]), hashlib.sha256(files[p]).hexdigest(), "alice")
        for p in ("alice/a1.txt", "alice/docs/a2.bin")}
    assert all(r["created"].endswith("Z") and r["expires"] is None for r in rows)
    assert listed(cfg, "--uploader", "carol@example.org") == {carol}
    assert listed(cfg) == everything
    assert listed(cfg, "--prefix", "bob/") == {"bob/b1.txt", "bob/b2.jpg"}
    assert listed(cfg, "--older-than", "0s") == everything  # stored before now
    assert listed(cfg, "--older-than", "1d") == set()
    assert listed(cfg, "--uploader", "alice", "--prefix", "alice/docs/") == {"alice/docs/a2.bin"}

    # usage: logical per uploader and in all; on disk the shared content counts once
    report = as_json(cfg, "usage")
    per = {u["uploader"]: (u["files"], u["bytes"]) for u in report["uploaders"]}
    assert per == {"alice": (2, len(shared) + 3000), "bob": (2, len(shared) + 5000),
                   "carol@example.org": (1, len(files[carol]))}
    total = report["total"]
    assert total["files"] == 5 and total["logical_bytes"] == sum(len(d) for d in files.values())
    assert total["physical_bytes"] == sum(len(d) for d in set(files.values()))
    assert total["blobs"] == 4 and total["dedup_saved_bytes"] == len(shared)
    assert "total" in ok(cfg, "usage").stdout

    # delete refuses without a selector, and a dry run deletes nothing
    r = hmacfs(cfg, "files", "delete")
    assert r.returncode == 2 and "refusing to delete without a selector" in r.stderr
    r = hmacfs(cfg, "files", "delete", "--dry-run")
    assert r.returncode == 2
    r = ok(cfg, "files", "delete", "--uploader", "bob", "--dry-run")
    assert set(r.stdout.split()) == {"bob/b1.txt", "bob/b2.jpg"} and "nothing was deleted" in r.stderr
    assert all(get(srv, p).status == 200 for p in files) and listed(cfg) == everything

    # delete bob's files: gone from the running server, his unshared blob too, the shared one stays
    r = ok(cfg, "files", "delete", "--uploader", "bob")
    assert set(r.stdout.split()) == {"bob/b1.txt", "bob/b2.jpg"}
    assert get(srv, "bob/b1.txt").status == 404 and get(srv, "bob/b2.jpg").status == 404
    assert not blob_file(srv, files["bob/b2.jpg"]).exists()
    assert blob_file(srv, shared).exists()
    for path in ("alice/a1.txt", "alice/docs/a2.bin", carol):
        resp = get(srv, path)
        assert resp.status == 200 and resp.body == files[path]
    assert listed(cfg) == everything - {"bob/b1.txt", "bob/b2.jpg"}
    assert "bob" not in {u["uploader"] for u in as_json(cfg, "usage")["uploaders"]}

    # the server keeps working on the same paths and blobs
    assert put(srv, "bob/b1.txt", shared).status == 201 and get(srv, "bob/b1.txt").body == shared
    assert as_json(cfg, "usage")["total"]["dedup_saved_bytes"] == len(shared)

    # selectors that match nothing, explicit paths, bad paths
    r = ok(cfg, "files", "delete", "--older-than", "1d")
    assert r.stdout == "" and "deleted 0 file(s)" in r.stderr
    ok(cfg, "files", "delete", "alice/docs/a2.bin")
    assert get(srv, "alice/docs/a2.bin").status == 404 and not blob_file(srv, files["alice/docs/a2.bin"]).exists()
    r = hmacfs(cfg, "files", "delete", "nobody/missing.txt")
    assert r.returncode == 1 and "not found" in r.stderr
    for bad in ("../etc/passwd", ".hmacfs/meta.sqlite3", "a//b"):
        r = hmacfs(cfg, "files", "delete", bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    r = ok(cfg, "files", "delete", "--uploader", "bob", "bob/b1.txt", "alice/a1.txt")  # paths must match too
    assert r.stdout.split() == ["bob/b1.txt"] and "kept (does not match the selectors): alice/a1.txt" in r.stderr
    assert get(srv, "bob/b1.txt").status == 404 and get(srv, "alice/a1.txt").status == 200
    assert blob_file(srv, shared).exists()

    # the last reference to the shared blob goes with alice's file; the server answers 404
    r = ok(cfg, "files", "delete", "--prefix", "alice/")
    assert r.stdout.split() == ["alice/a1.txt"]
    assert get(srv, "alice/a1.txt").status == 404 and not blob_file(srv, shared).exists()
    assert listed(cfg) == {carol} and get(srv, carol).body == files[carol]
    assert srv.proc is not None and srv.proc.poll() is None and srv.healthy()


def test_usage_and_selector_errors(hmacfs_factory, tmp_path: Path) -> None:
    srv = hmacfs_factory()
    cfg = srv.config_path
    assert put(srv, "x/one.txt", b"1").status == 201
    report = as_json(cfg, "usage")
    assert report["uploaders"] == [] and report["unattributed"] == {"files": 1, "bytes": 1}
    assert report["total"]["physical_bytes"] == 1 and report["total"]["blobs"] == 0
    for args in (["files"], ["files", "list", "--older-than", "soon"], ["files", "delete", "--prefix", ""]):
        r = hmacfs(cfg, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "hmacfs", "usage", "-config", str(tmp_path / "none.toml")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr
    r = hmacfs(cfg, "rekey")  # no [encryption]
    assert r.returncode == 2 and "encryption" in r.stderr
    assert get(srv, "x/one.txt").body == b"1"


def write_config(proc: HmacfsProcess) -> Path:
    proc.config_path.write_text(toml_writer.dumps(proc.config))
    return proc.config_path


def test_store_errors_are_one_line(tmp_path: Path) -> None:
    newer = HmacfsProcess(tmp_path / "newer")
    (newer.storage / ".hmacfs").mkdir(parents=True)
    db = sqlite3.connect(newer.storage / ".hmacfs" / "meta.sqlite3")
    db.execute("PRAGMA user_version = 99")
    db.close()
    for args in (["files", "list"], ["usage"], ["reindex"]):
        r = hmacfs(write_config(newer), *args)
        assert r.returncode == 1 and "newer hmacfs" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    blocked = HmacfsProcess(tmp_path / "blocked")
    (tmp_path / "a-file").write_text("not a directory")
    blocked.config["server"]["storagepath"] = str(tmp_path / "a-file" / "data")
    r = hmacfs(write_config(blocked), "files", "list")
    assert r.returncode == 1 and "not usable" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- reindex: adopting a prosody-filer store ----------------------------------------------------------

def test_reindex_adopts_a_store_without_changing_it(tmp_path: Path) -> None:
    proc = HmacfsProcess(tmp_path / "adopt")
    made = {"thomas/abc/catmetal.jpg": b"\xff\xd8\xff" + os.urandom(40000),
            "1f0e/notes.txt": b"plain notes\n", "deep/a/b/c/archive.tar.gz": os.urandom(1000),
            "empty/nothing.bin": b""}
    hidden = {".hidden/skip.txt": b"not served", "thomas/.staged": b"not served either"}
    for path, data in {**made, **hidden}.items():
        target = proc.storage / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
    before = {p: (proc.storage / p).stat().st_mtime_ns for p in made}
    cfg = write_config(proc)

    report = as_json(cfg, "reindex")
    assert (report["scanned"], report["added"], report["updated"], report["skipped"]) == (4, 4, 0, 0), report
    db = sqlite3.connect(proc.storage / ".hmacfs" / "meta.sqlite3")
    rows = {r[0]: r[1:] for r in db.execute("SELECT path, size, sha256, content_type FROM files")}
    assert rows == {
        "thomas/abc/catmetal.jpg": (len(made["thomas/abc/catmetal.jpg"]),
                                    hashlib.sha256(made["thomas/abc/catmetal.jpg"]).hexdigest(), "image/jpeg"),
        "1f0e/notes.txt": (12, hashlib.sha256(b"plain notes\n").hexdigest(), "text/plain"),
        "deep/a/b/c/archive.tar.gz": (1000, hashlib.sha256(made["deep/a/b/c/archive.tar.gz"]).hexdigest(),
                                      guess_type("archive.tar.gz")),  # whatever the server's rule says
        "empty/nothing.bin": (0, hashlib.sha256(b"").hexdigest(), "application/octet-stream"),
    }
    for path, data in {**made, **hidden}.items():
        assert (proc.storage / path).read_bytes() == data
    assert {p: (proc.storage / p).stat().st_mtime_ns for p in made} == before

    again = as_json(cfg, "reindex")
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 4)

    # a file changed outside hmacfs: its row is stale and is rebuilt
    notes = proc.storage / "1f0e" / "notes.txt"
    with open(notes, "ab") as f:
        f.write(b"more\n")
    os.utime(notes, ns=(before["1f0e/notes.txt"] + 10**9, before["1f0e/notes.txt"] + 10**9))
    changed = as_json(cfg, "reindex")
    assert (changed["added"], changed["updated"], changed["unchanged"]) == (0, 1, 3)
    assert db.execute("SELECT sha256, size FROM files WHERE path = '1f0e/notes.txt'").fetchone() == (
        hashlib.sha256(b"plain notes\nmore\n").hexdigest(), 17)
    db.close()
    assert "4 file(s) scanned" in ok(cfg, "reindex").stdout

    proc.start()  # a fresh server serves the recorded rows
    try:
        jpg = made["thomas/abc/catmetal.jpg"]
        r = get(proc, "thomas/abc/catmetal.jpg")
        assert r.status == 200 and r.body == jpg
        assert r.header("ETag") == '"' + hashlib.sha256(jpg).hexdigest()[:32] + '"'
        assert r.header("Content-Type") == "image/jpeg"
        r = get(proc, "1f0e/notes.txt")
        assert r.header("ETag") == '"' + hashlib.sha256(b"plain notes\nmore\n").hexdigest()[:32] + '"'
        assert get(proc, ".hidden/skip.txt").status == 400
        assert listed(cfg, "--prefix", "thomas/") == {"thomas/abc/catmetal.jpg"}
    finally:
        proc.close()
    assert (proc.storage / "thomas/abc/catmetal.jpg").stat().st_mtime_ns == before["thomas/abc/catmetal.jpg"]


# -- rekey ------------------------------------------------------------------------------------------

def encryption_ready() -> Optional[str]:
    """Why encryption cannot run here, or None."""
    try:
        from hmacfs.storage.aesgcm import load_libcrypto
        from hmacfs.storage.encrypted import SegmentReader  # noqa: F401

        load_libcrypto()
    except Exception as e:
        return f"encryption is not available: {e}"
    return None


KEYS = {"k1": "11" * 32, "k2": "22" * 32, "k3": "33" * 32}


def write_keys(path: Path, *ids: str) -> None:
    path.write_text("".join(f"{i} {KEYS[i]}\n" for i in ids))
    path.chmod(0o600)


def encrypted_files(storage: Path) -> dict[str, str]:
    """Every encrypted file below the storage dir (current files, versions, blobs) -> its header's key id."""
    out = {}
    for p in storage.rglob("*"):
        if p.is_file() and not p.is_symlink():
            head = p.read_bytes()[:64]
            if head[:8] == MAGIC:
                out[str(p.relative_to(storage))] = head[10:42].rstrip(b"\0").decode()
    return out


def restart(srv: HmacfsProcess) -> None:
    srv.stop()
    srv.start()


def test_rekey_reencrypts_everything_while_serving(hmacfs_factory, tmp_path: Path) -> None:
    why = encryption_ready()
    if why:
        pytest.skip(why)
    from hmacfs.storage.encrypted import Keyring, SegmentReader, SegmentWriter, decode_key

    keys = tmp_path / "keys"
    write_keys(keys, "k1")
    srv = hmacfs_factory({"encryption": {"enabled": True, "keyfile": str(keys)},
                          "deduplication": {"enabled": True},
                          "versioning": {"enableversioning": True, "maxversions": 2},
                          "uploads": {"maxuploadsize": "10MB"}})
    cfg = srv.config_path
    shared = b"shared secret bytes " * 1000
    contents = {"a/same.txt": shared, "b/same.txt": shared, "c/big.bin": os.urandom(2 * 1024 * 1024 + 77),
                "d/empty.txt": b"", "e/v.txt": b"version one"}
    for path, data in contents.items():
        assert put(srv, path, data).status == 201
    assert put(srv, "e/v.txt", b"version two").status == 201  # keeps version 1
    contents["e/v.txt"] = b"version two"

    def served(server: HmacfsProcess) -> None:
        for path, data in contents.items():
            r = get(server, path)
            assert r.status == 200 and r.body == data, (path, r)
        assert get(server, "e/v.txt", "?version=1").body == b"version one"

    def same_inode(*paths: Path) -> bool:
        return len({p.stat().st_ino for p in paths}) == 1

    def rows_follow_files() -> None:
        db = sqlite3.connect(srv.storage / ".hmacfs" / "meta.sqlite3")
        try:
            for path, mtime_ns in db.execute("SELECT path, mtime_ns FROM files WHERE encrypted = 1"):
                assert (srv.storage / path).stat().st_mtime_ns == mtime_ns, path
        finally:
            db.close()

    on_disk = encrypted_files(srv.storage)
    assert set(on_disk.values()) == {"k1"} and len(on_disk) == 11  # 5 blobs, 5 paths linking them, 1 version
    blob = blob_file(srv, shared)
    assert same_inode(srv.storage / "a/same.txt", srv.storage / "b/same.txt", blob)

    # rotation: k2 first, k1 still readable; a dry run changes nothing
    write_keys(keys, "k2", "k1")
    dry = as_json(cfg, "rekey", "--dry-run")
    assert dry["rekeyed"] == 5 and dry["names"] == len(on_disk), dry  # one per blob, with all its names
    assert encrypted_files(srv.storage) == on_disk
    restart(srv)  # the server must know k2 before files are written under it
    report = as_json(cfg, "rekey")
    assert report["failed"] == report["remaining"] == 0 and report["names"] == len(on_disk), report
    assert set(encrypted_files(srv.storage).values()) == {"k2"}
    assert same_inode(srv.storage / "a/same.txt", srv.storage / "b/same.txt", blob)
    rows_follow_files()
    served(srv)  # the running server reads the new files
    again = as_json(cfg, "rekey")
    assert (again["rekeyed"], again["names"], again["failed"]) == (0, 0, 0)
    assert again["current"] == again["encrypted"] == report["rekeyed"]

    # an interrupted run: the blob was re-encrypted, its paths were not yet
    write_keys(keys, "k3", "k2")
    restart(srv)
    ring = Keyring([("k3", decode_key(KEYS["k3"])), ("k2", decode_key(KEYS["k2"]))])
    staged = blob.with_name("partial")
    with open(blob, "rb") as src, open(staged, "wb", buffering=0) as dst:
        reader = SegmentReader(src.fileno(), ring)
        writer = SegmentWriter(dst, ring, reader.segment_size)
        for piece in reader.iter_range(0, reader.plaintext_size - 1):
            writer.write(piece)
        writer.finish()
    os.replace(staged, blob)
    assert not same_inode(srv.storage / "a/same.txt", blob)
    served(srv)
    report = as_json(cfg, "rekey")
    assert report["relinked"] == 1 and report["failed"] == 0, report
    assert set(encrypted_files(srv.storage).values()) == {"k3"}
    assert same_inode(srv.storage / "a/same.txt", srv.storage / "b/same.txt", blob)
    rows_follow_files()

    # an interrupted run between the renames and the rows: the row is set right (content checked)
    db = sqlite3.connect(srv.storage / ".hmacfs" / "meta.sqlite3")
    with db:
        db.execute("UPDATE files SET mtime_ns = 12345 WHERE path = 'c/big.bin'")
    db.close()
    report = as_json(cfg, "rekey")
    assert report["repaired"] == 1 and report["rekeyed"] == 0, report
    rows_follow_files()
    r = ok(cfg, "rekey")
    assert "0 file(s) re-encrypted" in r.stderr

    # reindex decrypts to hash the plaintext (a row lost between commit and record)
    big = contents["c/big.bin"]
    db = sqlite3.connect(srv.storage / ".hmacfs" / "meta.sqlite3")
    with db:
        db.execute("DELETE FROM files WHERE path = 'c/big.bin'")
    plain = HmacfsProcess(tmp_path / "nokeys", {**srv.config, "encryption": {"enabled": False}})
    skipped = as_json(write_config(plain), "reindex")
    assert skipped["skipped"] == 1 and "c/big.bin" in skipped["problems"][0], skipped
    assert db.execute("SELECT COUNT(*) FROM files WHERE path = 'c/big.bin'").fetchone() == (0,)
    added = as_json(cfg, "reindex")
    assert (added["added"], added["skipped"]) == (1, 0), added
    assert db.execute("SELECT size, sha256, encrypted FROM files WHERE path = 'c/big.bin'").fetchone() == (
        len(big), hashlib.sha256(big).hexdigest(), 1)
    cipher = srv.storage / "c" / "big.bin"  # a row that took the ciphertext for plaintext is rebuilt too
    with db:
        db.execute("UPDATE files SET size = ?, sha256 = ?, encrypted = 0, mtime_ns = ? WHERE path = 'c/big.bin'",
                   (cipher.stat().st_size, hashlib.sha256(cipher.read_bytes()).hexdigest(), cipher.stat().st_mtime_ns))
    fixed = as_json(cfg, "reindex")
    assert (fixed["updated"], fixed["skipped"]) == (1, 0), fixed
    assert db.execute("SELECT size, sha256, encrypted FROM files WHERE path = 'c/big.bin'").fetchone() == (
        len(big), hashlib.sha256(big).hexdigest(), 1)
    db.close()
    rows_follow_files()

    # k1 and k2 can go now
    write_keys(keys, "k3")
    restart(srv)
    served(srv)

    # a file under a key the keyfile does not hold is reported, and left as it is
    foreign = srv.storage / "z" / "foreign.bin"
    foreign.parent.mkdir()
    with open(foreign, "wb", buffering=0) as f:
        writer = SegmentWriter(f, Keyring([("k9", decode_key("99" * 32))]))
        writer.write(b"not ours")
        writer.finish()
    before = foreign.read_bytes()
    r = hmacfs(cfg, "rekey")
    assert r.returncode == 1 and "'k9'" in r.stderr and "not in the keyfile" in r.stderr, r.stderr
    assert foreign.read_bytes() == before
    served(srv)


def test_server_delete_after_tool_delete_keeps_a_shared_blob(hmacfs_factory) -> None:
    """The server caches rows; a DELETE of a path the tool already removed must not release the
    blob reference a second time (it would drop a blob another path still references)."""
    srv = hmacfs_factory({"deduplication": {"enabled": True}, "security": {"deletesecret": "d"}})
    data = b"shared by two paths" * 10
    assert put(srv, "alice/a.txt", data).status == 201 and put(srv, "bob/b.txt", data).status == 201
    ok(srv.config_path, "files", "delete", "bob/b.txt")
    target = signed_v3(srv.prefix, srv.secret, "bob/b.txt", "DELETE", int(time.time()) + 60)
    assert request(srv.port, "DELETE", target).status == 404
    assert blob_file(srv, data).exists()  # alice's row still references it
    db = sqlite3.connect(srv.storage / ".hmacfs" / "meta.sqlite3")
    try:
        assert db.execute("SELECT refs FROM blobs").fetchall() == [(1,)]
    finally:
        db.close()
    assert get(srv, "alice/a.txt").body == data
