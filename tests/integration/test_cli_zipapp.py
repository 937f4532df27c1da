"""The CLI verbs and the zipapp, run as a user runs them."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.support.client import request
from tests.support.hmacfs_proc import REPO, HmacfsProcess

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def hmacfs(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmacfs", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_version_and_help() -> None:
    for args in (["-version"], ["--version"], ["version"]):
        r = hmacfs(*args)
        assert r.returncode == 0 and r.stdout.startswith("hmacfs ")
    r = hmacfs("--help")
    assert r.returncode == 0 and "check-config" in r.stdout and "sign" in r.stdout


def test_check_config_masks_secrets_and_names_bad_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nlistenport = "127.0.0.1:1"\nmaxuplodsize = 1\n[security]\nsecret = "s3cr3t-value"\n')
    r = hmacfs("check-config", "-config", str(good))
    assert r.returncode == 0 and "s3cr3t-value" not in r.stdout + r.stderr and "********" in r.stdout
    assert "unknown key [server] maxuplodsize; did you mean [uploads] maxuploadsize?" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[uploads]\nmaxuploadsize = "lots"\n[security]\nsecret = "x"\n')
    r = hmacfs("check-config", "--config", str(bad))
    assert r.returncode == 2 and "maxuploadsize" in r.stderr and "lots" in r.stderr
    r = hmacfs("check-config", "-config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("cli"),
                         {"security": {"deletesecret": "d"}}).start()
    yield proc
    proc.close()


@pytest.mark.parametrize("protocol", ["v", "v2", "token", "v3", "jwt"])
def test_sign_mints_urls_the_server_accepts(server, tmp_path: Path, protocol: str) -> None:
    f = tmp_path / f"photo {protocol}.png"
    f.write_bytes(b"\x89PNG" + os.urandom(100))
    r = hmacfs("sign", "-config", str(server.config_path), "--file", str(f), "--protocol", protocol)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    url = urllib.parse.urlsplit(lines[0])
    headers = {"Content-Type": "image/png"}
    if protocol == "jwt":
        name, _, value = lines[1].partition(": ")
        assert name == "Authorization" and value.startswith("Bearer ")
        headers[name] = value
    assert url.port == server.port
    resp = request(server.port, "PUT", f"{url.path}?{url.query}" if url.query else url.path, f.read_bytes(), headers)
    assert resp.status == 201, (resp, lines)
    assert request(server.port, "GET", url.path).body == f.read_bytes()


def test_sign_get_and_delete(server) -> None:
    put = hmacfs("sign", "-config", str(server.config_path), "abc/d.txt", "--size", "1").stdout.strip()
    u = urllib.parse.urlsplit(put)
    assert request(server.port, "PUT", f"{u.path}?{u.query}", b"x").status == 201
    for protocol in ("v3", "token"):
        if protocol == "token":
            assert request(server.port, "PUT", f"{u.path}?{u.query}", b"x").status in (201, 409)
        d = hmacfs("sign", "-config", str(server.config_path), "abc/d.txt", "-X", "DELETE", "-p", protocol)
        assert d.returncode == 0, d.stderr
        du = urllib.parse.urlsplit(d.stdout.strip())
        assert request(server.port, "DELETE", f"{du.path}?{du.query}").status == 204
    r = hmacfs("sign", "-config", str(server.config_path), "abc/d.txt")  # v without a size
    assert r.returncode == 2 and "size" in r.stderr


def build_zipapp(out: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "-o", str(out)], check=True, timeout=60,
                   capture_output=True)
    return out


def test_zipapp_is_reproducible_and_serves(tmp_path: Path) -> None:
    a = build_zipapp(tmp_path / "a" / "hmacfs.pyz")
    b = build_zipapp(tmp_path / "b" / "hmacfs.pyz")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(a), "-version"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("hmacfs ")
    proc = HmacfsProcess(tmp_path / "srv", zipapp=a)
    proc.start()
    try:
        from tests.support.client import put
        assert put(proc, "z/ip.txt", b"zipapp").status == 201
        assert request(proc.port, "GET", "/upload/z/ip.txt").body == b"zipapp"
    finally:
        assert proc.stop() == 0
        proc.close()


def test_shipped_config_runs_out_of_the_box(tmp_path: Path) -> None:
    """The README's first command: the shipped config.toml, loopback, ./data."""
    import shutil
    import socket
    shutil.copy(REPO / "config.toml", tmp_path / "config.toml")
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.skip("port 8080 is taken on this machine (the shipped config's port)")
    p = subprocess.Popen([sys.executable, "-m", "hmacfs", "-config", "config.toml"], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import time
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if request(8080, "GET", "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("shipped config did not start")
        assert (tmp_path / "data" / ".hmacfs").is_dir()
    finally:
        p.terminate()
        assert p.wait(15) == 0
