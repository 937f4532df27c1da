"""The shipped fail2ban filter over a real hmacfs log: it finds exactly the auth failures.

Debian's `fail2ban-regex` runs the filter from contrib/fail2ban over the log of a server
that saw every kind of signature failure (v, v3, JWT, downloads, deletes, through a trusted
proxy, with a path that imitates the log line) mixed with ordinary traffic, refusals that
are not auth failures (404, 405, 411, 413, a ban) and the server's own ban line. The
addresses it reports must be exactly the failing clients, in order. fail2ban-regex takes a
path that does not exist for a log line or a regex and then reports 0 matches with exit 0,
so both paths are checked first.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hmacfs import auth
from tests.conftest import need_program
from tests.support.client import signed_put, signed_v3, url_path
from tests.support.hmacfs_proc import REPO, HmacfsProcess

from .test_guard import PROXY, Reply, call

FILTER = REPO / "contrib" / "fail2ban" / "filter.d" / "hmacfs.conf"
JAIL = REPO / "contrib" / "fail2ban" / "jail.d" / "hmacfs.local"
NORMAL = "127.0.0.40"  # ordinary traffic: never reported
IMITATION = "inj/x auth failure client=6.6.6.6 status=403 method=PUT"  # a path that imitates the line
LINE_BREAK = "inj/y\nWARNING hmacfs.auth: auth failure client=6.6.6.7 status=403 method=PUT"


def config() -> dict:
    return {"server": {"trustedproxies": [f"{PROXY}/32"]},
            "security": {"deletesecret": "del-secret", "banenabled": True, "banthreshold": 2},
            "downloads": {"requiresignature": True}, "uploads": {"maxuploadsize": "1KB"}}


def jwt(srv: HmacfsProcess, slot: str, filename: str, size: int, key: bytes = b"") -> dict[str, str]:
    claims = {"sub": "alice", "exp": int(time.time()) + 300, "slot": slot, "filename": filename, "filesize": size}
    return {"Authorization": "Bearer " + auth.jwt_encode(key or srv.secret.encode(), claims)}


def expect(reply: Reply, status: int) -> None:
    assert reply.status == status, reply


def traffic(srv: HmacfsProcess) -> tuple[list[str], list[str]]:
    """Drive the server; returns the addresses of the auth failures in order, and every signature,
    MAC and token sent (none may reach the log)."""
    failed: list[str] = []
    secrets: list[str] = []
    now = int(time.time())
    p = srv.prefix

    def fails(src: str, status: int, method: str, target: str, body=None, headers=None, forwarded: str = "") -> None:
        expect(call(srv, method, target, body, src, headers), status)
        failed.append(forwarded or src)

    def ok(status: int, method: str, target: str, body=None, headers=None, src: str = NORMAL) -> None:
        expect(call(srv, method, target, body, src, headers), status)

    good = signed_put(p, srv.secret, "f2b/good.txt", 5)
    secrets.append(good.split("?v=")[1])
    ok(201, "PUT", good, b"hello")
    get = signed_v3(p, srv.secret, "f2b/good.txt", "GET", now + 60)
    secrets.append(get.split("v3=")[1].split("&")[0])
    ok(200, "GET", get)
    ok(404, "GET", signed_v3(p, srv.secret, "f2b/missing.txt", "GET", now + 60))
    ok(404, "GET", signed_v3(p, srv.secret, IMITATION, "GET", now + 60))  # the imitation in an access line
    ok(400, "GET", signed_v3(p, srv.secret, LINE_BREAK, "GET", now + 60))  # refused before any signature check
    ok(200, "GET", "/health")
    ok(405, "PATCH", url_path(p, "f2b/good.txt"), b"x")
    ok(411, "PUT", url_path(p, "f2b/chunked.txt") + "?v=" + "0" * 64, None,
       {"Transfer-Encoding": "chunked"})
    ok(413, "PUT", signed_put(p, srv.secret, "f2b/big.bin", 2048), b"x" * 2048)
    ok(413, "PUT", url_path(p, "slot1/j.bin"), b"hello", jwt(srv, "slot1", "j.bin", 6))  # JWT size: not auth
    ok(204, "OPTIONS", url_path(p, "f2b/good.txt"))

    fails("127.0.0.21", 403, "PUT", url_path(p, "f2b/a.txt") + "?v=" + "1" * 64, b"hello")
    fails("127.0.0.21", 403, "PUT", url_path(p, "f2b/a.txt") + "?v2=" + "2" * 64, b"hello")  # bans .21
    ok(403, "PUT", signed_put(p, srv.secret, "f2b/banned.txt", 5), b"hello", src="127.0.0.21")  # a ban: not auth
    fails("127.0.0.22", 403, "PUT", url_path(p, "f2b/unsigned.txt"), b"hello")
    expired = signed_v3(p, srv.secret, "f2b/expired.txt", "PUT", now - 60)
    secrets.append(expired.split("v3=")[1].split("&")[0])
    fails("127.0.0.23", 410, "PUT", expired, b"hello")
    forged = jwt(srv, "slot2", "j.bin", 5, key=b"not-the-secret")
    secrets.append(forged["Authorization"].split()[1])
    fails("127.0.0.24", 401, "PUT", url_path(p, "slot2/j.bin"), b"hello", forged)
    wrong_slot = jwt(srv, "slot3", "j.bin", 5)
    secrets.append(wrong_slot["Authorization"].split()[1])
    fails("127.0.0.25", 400, "PUT", url_path(p, "other/j.bin"), b"hello", wrong_slot)
    fails("127.0.0.26", 403, "GET", url_path(p, "f2b/good.txt"))
    fails("127.0.0.27", 403, "DELETE", url_path(p, "f2b/good.txt") + "?token=" + "3" * 64)
    fails("127.0.0.28", 403, "PUT", url_path(p, IMITATION) + "?v=" + "4" * 64, b"hello")
    fails(PROXY, 403, "PUT", url_path(p, "f2b/v6.txt") + "?v=" + "5" * 64, b"hello",
          {"X-Forwarded-For": "2001:db8::5"}, forwarded="2001:db8::5")
    fails("127.0.0.29", 403, "PUT", url_path(p, "f2b/spoof.txt") + "?v=" + "6" * 64, b"hello",
          {"X-Forwarded-For": "6.6.6.8"})  # an untrusted peer: its own address is reported

    delete = auth.sign_query("token", srv.secret.encode(), method="DELETE", signed_path="f2b/good.txt",
                             full_path=p + "f2b/good.txt", delete_secret="del-secret")["token"]
    secrets.append(delete)
    ok(204, "DELETE", url_path(p, "f2b/good.txt") + "?token=" + delete)
    return failed, secrets


def fail2ban_regex(log: Path) -> tuple[list[str], str]:
    assert FILTER.is_file() and log.is_file()  # a missing path would silently become a regex or a log line
    ips = subprocess.run(["fail2ban-regex", "--out", "ip", str(log), str(FILTER)],
                         capture_output=True, text=True, timeout=120)
    assert ips.returncode == 0, ips.stderr
    summary = subprocess.run(["fail2ban-regex", str(log), str(FILTER)], capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    return ips.stdout.split(), summary.stdout


@pytest.mark.parametrize("form", ["text", "json"])
def test_the_shipped_filter_counts_exactly_the_auth_failures(hmacfs_factory, form: str) -> None:
    need_program("fail2ban-regex")
    srv = hmacfs_factory({**config(), "server": {**config()["server"], "loggingjson": form == "json"}})
    failed, secrets = traffic(srv)
    assert srv.stop() == 0  # the access lines are all written
    log = srv.log_path
    text = log.read_text()
    assert "ban client=127.0.0.21 until=" in text and "hmacfs.access" in text
    assert len(re.findall(r"auth failure client=", text)) == len(failed)

    reported, summary = fail2ban_regex(log)
    assert reported == failed, summary
    assert f"Failregex: {len(failed)} total" in summary
    assert re.search(rf"Lines: \d+ lines, 0 ignored, {len(failed)} matched", summary), summary
    for secret in [srv.secret, *secrets]:
        assert secret not in text  # no secret, MAC or token in any line
    assert "?v=" not in text and "v3=" not in text and "token=" not in text


def test_a_log_of_ordinary_traffic_has_no_match(hmacfs_factory) -> None:
    need_program("fail2ban-regex")
    srv = hmacfs_factory({"uploads": {"maxuploadsize": "1KB"}})
    for i in range(5):
        name = f"{uuid.uuid4()}/ok{i}.txt"
        expect(call(srv, "PUT", signed_put(srv.prefix, srv.secret, name, 5), b"hello", NORMAL), 201)
        expect(call(srv, "GET", url_path(srv.prefix, name), src=NORMAL), 200)
        expect(call(srv, "GET", url_path(srv.prefix, name + ".missing"), src=NORMAL), 404)
    assert srv.stop() == 0
    reported, summary = fail2ban_regex(srv.log_path)
    assert reported == [] and "Failregex: 0 total" in summary and "hmacfs.access" in srv.log_path.read_text()


def test_the_shipped_jail_loads_in_fail2ban(tmp_path: Path) -> None:
    """`fail2ban-client -t` on Debian's configuration with the shipped filter and jail added (its
    logpath pointed at a file that exists, and Debian's own sshd jail left out)."""
    need_program("fail2ban-client")
    if not Path("/etc/fail2ban/jail.conf").is_file():
        pytest.skip("needs Debian's /etc/fail2ban (the fail2ban package)")
    assert JAIL.is_file() and FILTER.is_file()
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for extra in (conf / "jail.d").iterdir():
        extra.unlink()
    (tmp_path / "hmacfs.log").write_text("")
    shutil.copy(FILTER, conf / "filter.d" / "hmacfs.conf")
    jail = JAIL.read_text()
    assert "logpath  = /var/log/hmacfs/hmacfs.log" in jail
    local = jail.replace("/var/log/hmacfs/hmacfs.log", str(tmp_path / "hmacfs.log"))
    (conf / "jail.d" / "hmacfs.local").write_text(local)
    out = subprocess.run(["fail2ban-client", "-c", str(conf), "-t"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr
    dump = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True, text=True, timeout=120)
    assert "['add', 'hmacfs', 'auto']" in dump.stdout
    assert "auth failure client=<ADDR>" in dump.stdout
