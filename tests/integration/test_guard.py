"""IP lists, rate limits and bans on the real server, from many loopback source addresses.

Linux routes all of 127.0.0.0/8 to loopback, so a test binds its client socket to
127.0.0.N to be client N. 127.0.0.10 plays a reverse proxy listed in `trustedproxies`;
any other address that sends X-Forwarded-For / Forwarded is an untrusted peer trying to
pick the address it is judged by. The health probe of HmacfsProcess comes from 127.0.0.1,
which no test denies, limits or bans.
"""
from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import uuid
from typing import Optional

import pytest

from hmacfs import auth
from tests.support import toml_writer
from tests.support.client import request, signed_put, url_path
from tests.support.hmacfs_proc import REPO, HmacfsProcess

PROXY = "127.0.0.10"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:120]!r}>"


def call(srv: HmacfsProcess, method: str, target: str, body: Optional[bytes] = None, src: str = "127.0.0.1",
         headers: Optional[dict[str, str]] = None) -> Reply:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10, source_address=(src, 0))
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def good_put(srv: HmacfsProcess, name: str, src: str = "127.0.0.1", headers: Optional[dict] = None) -> Reply:
    return call(srv, "PUT", signed_put(srv.prefix, srv.secret, name, 5), b"hello", src, headers)


def bad_put(srv: HmacfsProcess, name: str, src: str, headers: Optional[dict] = None) -> Reply:
    return call(srv, "PUT", url_path(srv.prefix, name) + "?v=" + "0" * 64, b"hello", src, headers)


def jwt_put(srv: HmacfsProcess, sub: str, src: str) -> tuple[Reply, str]:
    slot, filename = uuid.uuid4().hex, "j.bin"
    claims = {"sub": sub, "exp": int(time.time()) + 300, "slot": slot, "filename": filename, "filesize": 5}
    token = auth.jwt_encode(srv.secret.encode(), claims)
    reply = call(srv, "PUT", url_path(srv.prefix, f"{slot}/{filename}"), b"hello", src,
                 {"Authorization": "Bearer " + token})
    return reply, f"{slot}/{filename}"


def stored(srv: HmacfsProcess, name: str) -> bool:
    return (srv.storage / name).exists()


def metric(srv: HmacfsProcess, sample: str) -> float:
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_refusal_headers(reply: Reply) -> None:
    """Refusals leave through the one error path: CORS and the security headers are there."""
    assert reply.headers.get("access-control-allow-origin") == "*", reply.headers
    assert reply.headers.get("x-content-type-options") == "nosniff", reply.headers


def cli(srv: HmacfsProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmacfs", "-config", str(srv.config_path), *args],
                          capture_output=True, text=True, cwd=srv.workdir, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# --- IP lists ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("lists"), {
        "server": {"trustedproxies": [f"{PROXY}/32"]},
        "security": {"denyips": ["127.0.0.99/32", "2001:db8:bad::/48"]},
    }).start()
    yield proc
    proc.close()


def test_denyips_refuses_an_ipv4_client_and_stores_nothing(listed) -> None:
    denied = metric(listed, 'hmacfs_denied_requests_total{list="deny"}')
    reply = good_put(listed, "deny/v4.txt", src="127.0.0.99")
    assert reply.status == 403 and b"not accepted" in reply.body, reply
    assert_refusal_headers(reply)
    assert not stored(listed, "deny/v4.txt")
    assert call(listed, "GET", "/health", src="127.0.0.99").status == 403  # the main port refuses it all
    assert request(listed.metrics_port, "GET", "/health", host="127.0.0.1").status == 200
    assert good_put(listed, "deny/ok.txt", src="127.0.0.98").status == 201
    assert metric(listed, 'hmacfs_denied_requests_total{list="deny"}') - denied == 2


def test_denyips_applies_to_forwarded_ipv6_and_ipv4_mapped_clients(listed) -> None:
    via = {"2001:db8:bad::1": 403, "::ffff:127.0.0.99": 403, "2001:db8:900d::1": 201, "127.0.0.98": 201}
    for i, (client, status) in enumerate(via.items()):
        name = f"deny/fwd{i}.txt"
        reply = good_put(listed, name, src=PROXY, headers={"X-Forwarded-For": client})
        assert reply.status == status, (client, reply)
        assert stored(listed, name) == (status == 201)
    assert call(listed, "GET", "/health", src=PROXY, headers={"Forwarded": 'for="[2001:db8:bad::7]"'}).status == 403


def test_a_denied_client_cannot_escape_with_a_forwarded_header(listed) -> None:
    """The header is believed only from trusted proxies: it neither rescues a denied peer nor
    gets another peer refused in the name of a denied address."""
    for headers in ({"X-Forwarded-For": "127.0.0.98"}, {"Forwarded": "for=127.0.0.98"},
                    {"X-Forwarded-For": f"127.0.0.98, {PROXY}"}):
        assert good_put(listed, "deny/spoof.txt", src="127.0.0.99", headers=headers).status == 403, headers
    assert not stored(listed, "deny/spoof.txt")
    framed = good_put(listed, "deny/framed.txt", src="127.0.0.97", headers={"X-Forwarded-For": "127.0.0.99"})
    assert framed.status == 201


def test_allowips_admits_only_its_networks(hmacfs_factory) -> None:
    srv = hmacfs_factory({"security": {"allowips": ["127.0.0.1/32", "127.0.0.2/32"]}})
    assert good_put(srv, "allow/a.txt", src="127.0.0.2").status == 201
    reply = good_put(srv, "allow/b.txt", src="127.0.0.3")
    assert reply.status == 403 and not stored(srv, "allow/b.txt")
    assert_refusal_headers(reply)
    assert call(srv, "GET", "/health", src="127.0.0.3").status == 403
    assert good_put(srv, "allow/c.txt", src="127.0.0.3", headers={"X-Forwarded-For": "127.0.0.2"}).status == 403
    assert metric(srv, 'hmacfs_denied_requests_total{list="allow"}') == 3


def test_ipv6_lists_on_an_ipv6_listener_and_sighup(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"listenport": f"[::1]:{_free_v6_port()}"},
                          "security": {"allowips": ["::1/128"], "denyips": ["2001:db8::/32"]}})
    assert good_put(srv, "v6/a.txt", src="::1").status == 201
    srv.config["security"] = {**srv.config["security"], "allowips": [], "denyips": ["::1/128"]}
    srv.config_path.write_text(toml_writer.dumps(srv.config))
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)  # lists are [security] keys: a reload applies them
    wait_for(lambda: call(srv, "GET", "/health", src="::1").status == 403, "denyips = [::1] after SIGHUP")
    assert good_put(srv, "v6/b.txt", src="::1").status == 403 and not stored(srv, "v6/b.txt")


def _free_v6_port() -> int:
    import socket

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


# --- rate limits ---------------------------------------------------------------------------------

PER_MINUTE = 4


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("limits"), {
        "server": {"trustedproxies": [f"{PROXY}/32"]},
        "security": {"ratelimitingenabled": True, "maxrequestsperminute": PER_MINUTE,
                     "ratelimitexempt": ["127.0.0.3/32"]},
    }).start()
    yield proc
    proc.close()


def test_the_rate_limit_refuses_with_429_and_retry_after_and_stores_nothing(limited) -> None:
    assert [call(limited, "GET", "/upload/none/x", src="127.0.0.2").status for _ in range(PER_MINUTE)] == \
        [404] * PER_MINUTE
    reply = good_put(limited, "rate/a.txt", src="127.0.0.2")
    assert reply.status == 429, reply
    assert 1 <= int(reply.headers["retry-after"]) <= 60 // PER_MINUTE
    assert_refusal_headers(reply)
    assert not stored(limited, "rate/a.txt")
    assert call(limited, "GET", "/health", src="127.0.0.2").status == 200  # service endpoints take no token
    assert good_put(limited, "rate/b.txt", src="127.0.0.4").status == 201  # every address has its own bucket
    assert metric(limited, 'hmacfs_ratelimited_total{scope="address"}') >= 1


def test_exempt_networks_are_never_limited(limited) -> None:
    statuses = [call(limited, "GET", "/upload/none/x", src="127.0.0.3").status for _ in range(3 * PER_MINUTE)]
    assert statuses == [404] * (3 * PER_MINUTE)


def test_a_limited_client_cannot_refill_with_forwarded_headers(limited) -> None:
    """An untrusted peer naming a new address in every request still spends its own bucket;
    through the trusted proxy, each forwarded client has its own."""
    statuses = [call(limited, "GET", "/upload/none/x", src="127.0.0.5",
                     headers={"X-Forwarded-For": f"127.0.1.{i}", "Forwarded": f"for=127.0.2.{i}"}).status
                for i in range(PER_MINUTE + 2)]
    assert statuses == [404] * PER_MINUTE + [429, 429]
    forwarded = [call(limited, "GET", "/upload/none/x", src=PROXY, headers={"X-Forwarded-For": "127.0.0.6"}).status
                 for _ in range(PER_MINUTE + 1)]
    assert forwarded == [404] * PER_MINUTE + [429]
    assert call(limited, "GET", "/upload/none/x", src=PROXY, headers={"X-Forwarded-For": "127.0.0.7"}).status == 404


def test_a_jwt_sub_has_its_own_bucket_across_addresses(limited) -> None:
    results = [jwt_put(limited, "alice", f"127.0.3.{i}") for i in range(PER_MINUTE + 1)]
    assert [r.status for r, _ in results] == [201] * PER_MINUTE + [429], results
    assert not stored(limited, results[-1][1])
    assert "retry-after" in results[-1][0].headers
    assert jwt_put(limited, "bob", "127.0.3.200")[0].status == 201
    assert metric(limited, 'hmacfs_ratelimited_total{scope="uploader"}') == 1


# --- bans ------------------------------------------------------------------------------------------

THRESHOLD = 3


@pytest.fixture(scope="module")
def banning(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("bans"), {
        "server": {"trustedproxies": [f"{PROXY}/32"]},
        "security": {"banenabled": True, "banthreshold": THRESHOLD, "banwindow": "1m", "banduration": "1h"},
    }).start()
    yield proc
    proc.close()


def fail(srv: HmacfsProcess, src: str, times: int = THRESHOLD, headers: Optional[dict] = None) -> None:
    assert [bad_put(srv, f"ban/x{i}.txt", src, headers).status for i in range(times)] == [403] * times


def test_repeated_auth_failures_ban_even_a_good_signature_across_a_restart(banning) -> None:
    bans, refused = metric(banning, "hmacfs_bans_total"), metric(banning, "hmacfs_banned_requests_total")
    fail(banning, "127.0.0.50", THRESHOLD - 1)
    assert good_put(banning, "ban/before.txt", src="127.0.0.50").status == 201  # not yet
    fail(banning, "127.0.0.50", 1)
    reply = good_put(banning, "ban/after.txt", src="127.0.0.50")
    assert reply.status == 403 and b"banned" in reply.body, reply
    assert_refusal_headers(reply)
    assert not stored(banning, "ban/after.txt")
    assert call(banning, "GET", "/health", src="127.0.0.50").status == 403
    assert good_put(banning, "ban/other.txt", src="127.0.0.51").status == 201
    assert metric(banning, "hmacfs_bans_total") - bans == 1
    assert metric(banning, "hmacfs_banned_requests_total") - refused == 2
    assert "ban client=127.0.0.50 until=" in banning.log()

    assert banning.stop() == 0
    banning.start()
    assert good_put(banning, "ban/restarted.txt", src="127.0.0.50").status == 403
    assert not stored(banning, "ban/restarted.txt")
    assert good_put(banning, "ban/other2.txt", src="127.0.0.51").status == 201


def test_bans_cli_lists_and_lifts_a_ban_beside_the_running_server(banning) -> None:
    fail(banning, "127.0.0.55")
    assert good_put(banning, "ban/cli1.txt", src="127.0.0.55").status == 403
    listing = cli(banning, "bans", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    bans = {b["address"]: b for b in json.loads(listing.stdout)}
    assert bans["127.0.0.55"]["failures"] == THRESHOLD and bans["127.0.0.55"]["reason"] == "403 signature mismatch"
    table = cli(banning, "bans", "list")
    assert table.returncode == 0 and table.stdout.startswith("ADDRESS") and "127.0.0.55" in table.stdout

    lifted = cli(banning, "bans", "remove", "127.0.0.55")
    assert lifted.returncode == 0, lifted.stderr
    wait_for(lambda: good_put(banning, "ban/cli2.txt", src="127.0.0.55").status == 201, "the lifted ban still holds",
             timeout=5)
    assert cli(banning, "bans", "remove", "127.0.0.55").returncode == 1  # no longer banned
    bad = cli(banning, "bans", "remove", "not-an-address")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


def test_bans_fall_on_the_real_client_never_on_a_spoofed_or_forwarded_one(banning) -> None:
    """An untrusted peer that names someone else in X-Forwarded-For bans itself, not the victim;
    behind the trusted proxy, the forwarded client is banned, not the proxy."""
    fail(banning, "127.0.0.60", headers={"X-Forwarded-For": "127.0.0.61", "Forwarded": "for=127.0.0.61"})
    assert good_put(banning, "ban/spoofer.txt", src="127.0.0.60", headers={"X-Forwarded-For": "127.0.0.62"}).status \
        == 403
    assert good_put(banning, "ban/victim.txt", src="127.0.0.61").status == 201
    log = banning.log()
    assert "auth failure client=127.0.0.60 " in log and "client=127.0.0.61" not in log

    fail(banning, PROXY, headers={"X-Forwarded-For": "127.0.0.70"})
    assert good_put(banning, "ban/fwd70.txt", src=PROXY, headers={"X-Forwarded-For": "127.0.0.70"}).status == 403
    assert good_put(banning, "ban/fwd71.txt", src=PROXY, headers={"X-Forwarded-For": "127.0.0.71"}).status == 201
    assert good_put(banning, "ban/proxy.txt", src=PROXY).status == 201
