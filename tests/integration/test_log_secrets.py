"""No secret, MAC, JWT or whole upload id in any log line.

Why: a log is read by far more people (and programs) than a secret is meant for: it goes to
journald, to fail2ban, into support tickets and backups. Every signature kind hmacfs accepts
travels in the request (the query string, the Authorization header), and an upload resource's
URL is its capability. So the query string is never logged, the access log shows only the
first 8 characters of an upload id, and the auth-failure line (fail2ban's) names the path
without its query.

Two guards:
- session-wide (tests/conftest.py): every hmacfs log of the run is scanned at the end
  (`scan_logs` in tests/support/hmacfs_proc.py);
- here, right away: one server at loglevel debug (plain and JSON logs) gets a request with
  every signature kind, valid and invalid (v, v2, token, v3, previous secret, JWT bearer,
  delete token, tus creation and its resource, IETF creation and its resource), and its log
  is checked after a clean stop (which flushes the access log) for each value actually sent.
The scanner itself is checked on a planted log, so these tests can fail.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from hmacfs import auth
from tests.support.client import request, signed_put, signed_v3, url_path
from tests.support.hmacfs_proc import HmacfsProcess, RunLog, config_secrets, scan_log, scan_logs
from tests.support.ietf_client import RawConnection, RawResponse, request_head

MAC = "0123456789abcdef" * 4
UPLOAD_ID = "AbCdEfGh_-0123456789abcdefghijkl"
JWT = auth.jwt_encode(b"k" * 16, {"slot": "s", "exp": 1})
SECRETS = {"delete": "delete-secret-for-logs", "jwt": "jwt-secret-for-the-logs", "previous": "previous-secret-logs"}
TUS = "1.0.0"


# -- the scanner ------------------------------------------------------------------------------------

def test_the_scanner_finds_every_kind_and_only_those(tmp_path: Path) -> None:
    """Each kind planted in a log is reported with its line; ordinary lines (the truncated id the
    access log shows, a content hash, short query-like text, an ETag) are not."""
    log = tmp_path / "hmacfs.log"
    lines = [
        'INFO hmacfs.access: 127.0.0.1 "PATCH /upload/.uploads/AbCdEfGh..." 204 0 1.0ms',   # 1 clean
        f"INFO hmacfs: stored a/b.txt sha256={MAC} etag=\"{MAC[:32]}\" v=1 token=abc",      # 2 clean
        "DEBUG hmacfs: config secret is the-server-secret-123",                            # 3 secret
        f'INFO hmacfs.access: 127.0.0.1 "PUT /upload/a/b?v={MAC}" 201',                   # 4 v
        f"WARNING hmacfs.auth: auth failure v2={MAC.upper()} token={MAC} v3={MAC}",        # 5 v2, token, v3
        f"DEBUG hmacfs: Authorization: Bearer {JWT}",                                      # 6 JWT
        f'INFO hmacfs.access: 127.0.0.1 "HEAD /upload/.uploads/{UPLOAD_ID}" 200',          # 7 id
        f"ERROR hmacfs: partial upload: /data/.hmacfs/partials/{UPLOAD_ID}: I/O error",    # 8 id
    ]
    log.write_text("\n".join(lines) + "\n")
    leaks = scan_log(log, {"the-server-secret-123", "unused-secret"})
    found = sorted((leak.line, leak.what) for leak in leaks)
    assert found == [(3, "the secret the...(21 chars)"),
                     (4, "a 64-hex MAC after v=, v2=, v3= or token="),
                     (5, "a 64-hex MAC after v=, v2=, v3= or token="),
                     (5, "a 64-hex MAC after v=, v2=, v3= or token="),
                     (5, "a 64-hex MAC after v=, v2=, v3= or token="),
                     (6, "a JWT"), (7, "a whole upload id after /.uploads/"),
                     (8, "a whole upload id after partials/")], found
    assert all(str(leak).startswith(f"{log}:{leak.line}: ") for leak in leaks)
    assert not any("the-server-secret-123" in str(leak) or MAC in str(leak) for leak in leaks)  # masked


def test_config_secrets_finds_every_secret(tmp_path: Path) -> None:
    """Secrets anywhere in a config (aliases, flat keys, lists, a secretfile, a keyfile), none too
    short to search for."""
    (tmp_path / "secret.txt").write_text("from-a-secret-file\n")
    (tmp_path / "keys").write_text(f"k1 {'11' * 32}\n")
    config = {"secret": "flat-secret-value", "server": {"listenport": "127.0.0.1:1"},
              "security": {"previous_secrets": ["old-secret-1", "x"], "JWTSecret": "jwt-secret-value",
                           "deletesecret": "d", "secretfile": "secret.txt"},
              "encryption": {"enabled": True, "keyfile": "keys"}, "storage": {"s3secretkey": "s3-secret-key"}}
    assert config_secrets(config, tmp_path) == {"flat-secret-value", "old-secret-1", "jwt-secret-value",
                                                "from-a-secret-file", "11" * 32, "s3-secret-key"}


# -- the server, with every signature kind ---------------------------------------------------------

def _raw(srv: HmacfsProcess, method: str, target: str, headers: list[tuple[str, str]],
         body: bytes = b"") -> RawResponse:
    """One request on its own connection, 1xx responses (the IETF draft's 104) skipped."""
    fields = [*headers, ("Connection", "close")]
    if method != "HEAD":
        fields.append(("Content-Length", str(len(body))))
    with RawConnection(srv.port) as conn:
        conn.send(request_head(method, target, fields) + body)
        return conn.read_final(method)[1]


def _upload_id(response: RawResponse) -> str:
    location = response.header("Location")
    assert location and "/.uploads/" in location, response
    return location.rsplit("/", 1)[1]


class Traffic:
    """The requests made, and every value that must not reach the log."""

    def __init__(self, srv: HmacfsProcess) -> None:
        self.srv = srv
        self.sent: set[str] = set()      # MACs, tokens and upload ids that travelled in requests
        self.statuses: list[int] = []

    def query_values(self, target: str) -> str:
        for item in target.partition("?")[2].split("&"):
            name, _, value = item.partition("=")
            if name in ("v", "v2", "v3", "token"):
                self.sent.add(value)
        return target

    def http(self, method: str, target: str, body: Optional[bytes] = None,
             headers: Optional[dict[str, str]] = None, expect: Optional[int] = None) -> int:
        status = request(self.srv.port, method, self.query_values(target), body, headers).status
        self.statuses.append(status)
        assert expect is None or status == expect, (method, target, status)
        return status

    def raw(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> RawResponse:
        response = _raw(self.srv, method, self.query_values(target), headers, body)
        self.statuses.append(response.status)
        return response


def _every_signature_kind(t: Traffic) -> None:
    srv, now = t.srv, int(time.time())
    key = srv.secret
    data = b"log secrets test"

    def slot(name: str = "f.txt") -> str:
        return f"{uuid.uuid4().hex}/{name}"

    # v, v2, token (valid, then a wrong MAC), v3 (valid, wrong, expired), the previous secret
    for protocol in ("v", "v2", "token"):
        t.http("PUT", signed_put(srv.prefix, key, slot(), len(data), protocol), data, expect=201)
        t.http("PUT", url_path(srv.prefix, slot()) + f"?{protocol}={MAC}", data, expect=403)
    t.http("PUT", signed_v3(srv.prefix, key, slot(), "PUT", now + 60), data, expect=201)
    t.http("PUT", url_path(srv.prefix, slot()) + f"?v3={MAC}&expires={now + 60}", data, expect=403)
    t.http("PUT", signed_v3(srv.prefix, key, slot(), "PUT", now - 60), data, expect=410)
    t.http("PUT", signed_put(srv.prefix, SECRETS["previous"], slot(), len(data)), data, expect=201)

    # JWT bearer (Prosody's mod_http_file_share): valid, wrong key, expired
    for jwt_key, exp, expect in ((SECRETS["jwt"], now + 60, 201), ("not-the-key-at-all", now + 60, 401),
                                 (SECRETS["jwt"], now - 60, 410)):
        path = slot()
        slot_id, _, name = path.partition("/")
        token = auth.jwt_encode(jwt_key.encode(), {"slot": slot_id, "filename": name, "filesize": len(data),
                                                    "exp": exp, "sub": "user@example.org"})
        t.sent.add(token)
        t.http("PUT", url_path(srv.prefix, path), data, {"Authorization": f"Bearer {token}"}, expect=expect)

    # DELETE: Metronome's delete token (valid, wrong) and v3 signed for DELETE
    for protocol in ("token", "v3"):
        path = slot()
        t.http("PUT", signed_put(srv.prefix, key, path, len(data)), data, expect=201)
        if protocol == "token":
            q = auth.sign_query("token", key.encode(), method="DELETE", signed_path=path,
                                full_path=srv.prefix + path, delete_secret=SECRETS["delete"])
            t.http("DELETE", url_path(srv.prefix, path) + f"?token={MAC}", expect=403)
            t.http("DELETE", url_path(srv.prefix, path) + f"?token={q['token']}", expect=204)
        else:
            t.http("DELETE", signed_v3(srv.prefix, key, path, "DELETE", now + 60), expect=204)

    # tus: creation (valid, invalid), HEAD, PATCH to the end, termination of another, unknown id
    tus = [("Tus-Resumable", TUS)]
    created = t.raw("POST", signed_put(srv.prefix, key, slot(), len(data)), [*tus, ("Upload-Length", str(len(data)))])
    assert created.status == 201, created
    upload = srv.prefix + ".uploads/" + _upload_id(created)
    t.sent.add(_upload_id(created))
    assert t.raw("HEAD", upload, tus).status == 200
    octet = ("Content-Type", "application/offset+octet-stream")
    patched = t.raw("PATCH", upload, [*tus, ("Upload-Offset", "0"), octet], data)
    assert patched.status == 204, patched
    other = t.raw("POST", signed_put(srv.prefix, key, slot(), 10), [*tus, ("Upload-Length", "10")])
    t.sent.add(_upload_id(other))
    assert t.raw("DELETE", srv.prefix + ".uploads/" + _upload_id(other), tus).status == 204
    assert t.raw("POST", url_path(srv.prefix, slot()) + f"?v={MAC}", [*tus, ("Upload-Length", "10")]).status == 403
    assert t.raw("HEAD", srv.prefix + ".uploads/" + UPLOAD_ID, tus).status == 404
    t.sent.add(UPLOAD_ID)

    # IETF resumable upload (draft interop version 6): creation, offset, append with completion
    ietf = [("Upload-Draft-Interop-Version", "6")]
    created = t.raw("POST", signed_put(srv.prefix, key, slot(), len(data)),
                    [*ietf, ("Upload-Complete", "?0"), ("Upload-Length", str(len(data)))])
    assert created.status == 201, created
    upload = srv.prefix + ".uploads/" + _upload_id(created)
    t.sent.add(_upload_id(created))
    assert t.raw("HEAD", upload, ietf).status == 204
    done = t.raw("PATCH", upload, [*ietf, ("Upload-Complete", "?1"), ("Upload-Offset", "0"),
                                   ("Content-Type", "application/partial-upload")], data)
    assert 200 <= done.status < 300, done
    assert t.raw("PUT", url_path(srv.prefix, slot()) + f"?v={MAC}",
                 [*ietf, ("Upload-Complete", "?1")], data).status == 403

    # a download with a signature it does not need, and a bearer token on a GET
    path = slot()
    t.http("PUT", signed_put(srv.prefix, key, path, len(data)), data, expect=201)
    t.http("GET", signed_v3(srv.prefix, key, path, "GET", now + 60), expect=200)
    t.http("GET", url_path(srv.prefix, path), headers={"Authorization": f"Bearer {JWT}"}, expect=200)
    t.sent.add(JWT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("json_logs", [False, True], ids=["text", "json"])
def test_every_signature_kind_leaves_no_trace_in_the_log(hmacfs_factory, json_logs: bool) -> None:
    """Every signature kind, valid and invalid, at loglevel debug: afterwards the log names the
    requests (so the scan had something to read) but holds none of the secrets, MACs, tokens or
    upload ids that travelled."""
    srv = hmacfs_factory({"server": {"loglevel": "debug", "loggingjson": json_logs},
                          "security": {"deletesecret": SECRETS["delete"], "jwtsecret": SECRETS["jwt"],
                                       "previoussecrets": [SECRETS["previous"]]}})
    traffic = Traffic(srv)
    _every_signature_kind(traffic)
    assert srv.stop() == 0  # a clean stop flushes the access log
    text = srv.log()
    assert text.count("/.uploads/") >= 6 and text.count(srv.prefix) >= len(traffic.statuses), text[-3000:]
    assert {201, 204, 401, 403, 404, 410} <= set(traffic.statuses)
    entry = RunLog((srv.log_path,), srv.config_path, frozenset(config_secrets(srv.config, srv.workdir)))
    assert set(SECRETS.values()) | {srv.secret} <= entry.secrets
    leaks = scan_logs([entry])
    assert not leaks, "\n".join(map(str, leaks))
    for value in sorted(traffic.sent):  # every value actually sent, whatever its shape
        assert value not in text, f"{value[:12]}... ({len(value)} chars) is in {srv.log_path}"
