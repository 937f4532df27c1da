"""hmacfs behind Debian's nginx (and HAProxy when installed), configured from docs/reverse-proxy.md.

The proxy terminates TLS with a throwaway self-signed certificate. One signed upload and
download pass through it with Prosody's lowercase escapes in the path (the proxy must not
touch the path). The client connects from 127.0.0.66, the proxy from 127.0.0.1: hmacfs's
access log (JSON) must name 127.0.0.66, which it can only know from X-Forwarded-For and
`[server] trustedproxies` as the doc sets them.

Each proxy has its own hmacfs, configured as the doc says for it: nginx's with the doc's
hmacfs block as it is (`[uploads] interimresponses` at its default, "direct"), HAProxy's with
the doc's `interimresponses = "always"` line added. Resumable uploads (the doc's "Resumable
uploads"): behind nginx an IETF `PUT` is an ordinary PUT (no 104 ever reaches nginx, which
would take it for the final response), while IETF creation by POST and tus resume; behind
HAProxy the 104 arrives as an interim response and a broken-off IETF PUT resumes. A third
nginx, in front of an hmacfs that does not list it in trustedproxies, shows the doc's warning.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import need_program
from tests.support.hmacfs_proc import HmacfsProcess, free_port, merge

from . import httpraw
from .docsnippets import fill, hmacfs_overrides, snippet
from .procs import port_open, stop_tree, tail, wait_until

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

pytestmark = [pytest.mark.xmpp, pytest.mark.timeout(120)]

CLIENT = "127.0.0.66"  # the "real" client behind the proxy
DENIED_CLIENT = "127.0.0.99"  # listed in [security] denyips
BODY = os.urandom(1024 * 1024 + 17)  # bigger than nginx's default body limit and one proxy buffer


@dataclass
class Tls:
    """A self-signed certificate for 127.0.0.1 / ::1 and a client context that trusts it."""

    cert: Path
    key: Path
    combined: Path  # HAProxy wants chain and key in one file
    context: ssl.SSLContext


@dataclass
class Front:
    """A proxy's TLS port on 127.0.0.1 and the hmacfs behind it."""

    port: int
    hm: HmacfsProcess

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    need_program("openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "fullchain.pem", d / "privkey.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=share.example.org", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=IP:127.0.0.1,IP:::1,DNS:share.example.org"],
                   check=True, capture_output=True, timeout=60)
    combined = d / "share.example.org.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    return Tls(cert, key, combined, ssl.create_default_context(cafile=str(cert)))


def doc_hmacfs_config(*extra: str) -> dict[str, Any]:
    """The doc's hmacfs block (prefix, trusted proxies, size; the fixture owns port and storage),
    with the doc's `extra` hmacfs blocks merged in as an operator adds their lines."""
    doc = tomllib.loads(snippet("reverse-proxy.md", "hmacfs-behind-proxy"))
    assert doc["server"]["listenport"].startswith("127.0.0.1:"), "the doc must keep hmacfs on loopback"
    config = hmacfs_overrides("reverse-proxy.md", "hmacfs-behind-proxy", {})
    for name in extra:
        config = merge(config, tomllib.loads(snippet("reverse-proxy.md", name)))
    return config


def start_hmacfs(workdir: Path, config: dict[str, Any]) -> HmacfsProcess:
    return HmacfsProcess(workdir, merge(config, {"server": {"loggingjson": True}})).start()


@pytest.fixture(scope="module")
def hmacfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """hmacfs with the doc's proxy settings as they are (behind nginx) and one denied client."""
    config = merge(doc_hmacfs_config(), {"security": {"denyips": [f"{DENIED_CLIENT}/32"]}})
    assert "interimresponses" not in config["uploads"], "behind nginx the doc leaves interimresponses at its default"
    proc = start_hmacfs(tmp_path_factory.mktemp("hmacfs-nginx"), config)
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def hmacfs_haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """hmacfs with the doc's proxy settings plus its HAProxy line (`interimresponses = "always"`)."""
    proc = start_hmacfs(tmp_path_factory.mktemp("hmacfs-haproxy"), doc_hmacfs_config("hmacfs-for-haproxy"))
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def hmacfs_untrusting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """The doc's hmacfs block without its trustedproxies line: the mistake the doc warns about."""
    config = doc_hmacfs_config()
    del config["server"]["trustedproxies"]
    proc = start_hmacfs(tmp_path_factory.mktemp("hmacfs-untrusting"), config)
    try:
        yield proc
    finally:
        proc.close()


def run_proxy(cmd: list[str], port: int, workdir: Path, what: str) -> subprocess.Popen:
    """Start a proxy in the foreground of its own session and wait for its TLS port."""
    log = workdir / f"{what}.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: port_open(port), proc, 30, what, lambda: tail(log) + tail(workdir / "error.log"))
    except BaseException:
        stop_tree(proc)
        raise
    return proc


def start_nginx(w: Path, tls: Tls, hm: HmacfsProcess, http2: bool = False) -> tuple[subprocess.Popen, int]:
    """Debian nginx running the doc's server block (with `http2` on its listen lines if asked,
    as the doc's note allows); returns the process and its TLS port."""
    binary = need_program("nginx")
    port = free_port()
    h2 = " http2" if http2 else ""
    server = fill(snippet("reverse-proxy.md", "nginx"), {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl{h2};",
        "listen [::]:443 ssl;": f"listen [::1]:{port} ssl{h2};",
        "/etc/ssl/hmacfs/fullchain.pem": str(tls.cert),
        "/etc/ssl/hmacfs/privkey.pem": str(tls.key),
        "http://127.0.0.1:8080": hm.base_url,
    })
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {w / kind};" for kind in kinds)
    conf = w / "nginx.conf"
    conf.write_text(f"""# test scaffolding around the doc's server block
user root;
daemon off;
worker_processes 1;
pid {w / "nginx.pid"};
error_log {w / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log {w / "access.log"};
{temp}
{server}
}}
""")
    base = [binary, "-p", str(w), "-e", str(w / "error.log"), "-c", str(conf)]
    checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    return run_proxy(base, port, w, "nginx"), port


def nginx_front(tmp_path_factory: pytest.TempPathFactory, tls: Tls, hm: HmacfsProcess,
                http2: bool = False) -> Iterator[Front]:
    proc, port = start_nginx(tmp_path_factory.mktemp("nginx-h2" if http2 else "nginx"), tls, hm, http2)
    try:
        yield Front(port, hm)
    finally:
        stop_tree(proc)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, tls: Tls, hmacfs: HmacfsProcess) -> Iterator[Front]:
    """Debian nginx running the doc's server block in front of the doc's hmacfs."""
    yield from nginx_front(tmp_path_factory, tls, hmacfs)


@pytest.fixture(scope="module")
def nginx_h2(tmp_path_factory: pytest.TempPathFactory, tls: Tls, hmacfs: HmacfsProcess) -> Iterator[Front]:
    """The doc's nginx block with `http2` added to its listen lines."""
    yield from nginx_front(tmp_path_factory, tls, hmacfs, http2=True)


@pytest.fixture(scope="module")
def nginx_untrusted(tmp_path_factory: pytest.TempPathFactory, tls: Tls,
                    hmacfs_untrusting: HmacfsProcess) -> Iterator[Front]:
    """The doc's nginx block in front of an hmacfs that does not list it in trustedproxies."""
    yield from nginx_front(tmp_path_factory, tls, hmacfs_untrusting)


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory, tls: Tls, hmacfs_haproxy: HmacfsProcess) -> Iterator[Front]:
    """HAProxy running the doc's frontend/backend in front of the doc's hmacfs for HAProxy."""
    binary = need_program("haproxy")
    w = tmp_path_factory.mktemp("haproxy")
    port = free_port()
    body = fill(snippet("reverse-proxy.md", "haproxy"), {
        "bind :443": f"bind 127.0.0.1:{port}",
        "/etc/haproxy/certs/share.example.org.pem": str(tls.combined),
        "127.0.0.1:8080": f"127.0.0.1:{hmacfs_haproxy.port}",
    })
    conf = w / "haproxy.cfg"
    conf.write_text(f"# test scaffolding around the doc's sections\nglobal\n    maxconn 64\n\n{body}")
    checked = subprocess.run([binary, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    proc = run_proxy([binary, "-db", "-f", str(conf)], port, w, "haproxy")
    try:
        yield Front(port, hmacfs_haproxy)
    finally:
        stop_tree(proc)


def signed_path(hm: HmacfsProcess, name: str) -> str:
    """A v1 URL path+query with Prosody's lowercase escapes for `proxy/<name>`."""
    path = f"proxy/{name}"
    mac = httpraw.mac(hm.secret, f"{path} {len(BODY)}")
    return f"{hm.prefix}proxy/{httpraw.prosody_quote(name)}?v={mac}"


def access_clients(hm: HmacfsProcess, method: str, name: str, timeout: float = 10.0) -> list[str]:
    """Client addresses hmacfs logged for `method` on proxy/<name> (JSON access log).

    The access line is written after the response is sent, so poll until it shows up.
    """
    deadline = time.monotonic() + timeout
    while True:
        clients = []
        for line in hm.log().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            path = urllib.parse.unquote(str(record.get("path", "")))
            if record.get("method") == method and path.endswith(f"/proxy/{name}"):
                clients.append(record.get("client"))
        if clients or time.monotonic() > deadline:
            return clients
        time.sleep(0.05)


def check_through_proxy(front: Front, tls: Tls, name: str) -> None:
    """A signed PUT and a GET pass the proxy unchanged; hmacfs sees the client behind the proxy."""
    hm = front.hm
    target = signed_path(hm, name)
    put = httpraw.request("PUT", front.url + target, BODY, {"Content-Type": "image/png"}, context=tls.context,
                          source_address=(CLIENT, 0))
    assert put.status == 201, (put.status, put.body[:200], hm.log()[-3000:])
    assert put.headers.get("Access-Control-Allow-Origin"), "CORS headers lost on the way through the proxy"
    assert (hm.storage / "proxy" / name).read_bytes() == BODY
    got = httpraw.request("GET", front.url + target.split("?")[0], context=tls.context)
    assert got.status == 200 and got.body == BODY, (got.status, len(got.body))
    assert access_clients(hm, "PUT", name) == [CLIENT], hm.log()[-3000:]


def test_nginx_doc_config_proxies_signed_upload(nginx: Front, tls: Tls) -> None:
    check_through_proxy(nginx, tls, "nginx Bild (ä).png")
    path = f"{nginx.hm.prefix}proxy/{httpraw.prosody_quote('nginx Bild (ä).png')}"
    again = httpraw.request("GET", f"https://[::1]:{nginx.port}{path}", context=tls.context)
    assert again.status == 200 and again.body == BODY, "the doc's IPv6 listen line does not serve"


def test_doc_check_commands_through_nginx(nginx: Front, tls: Tls) -> None:
    """The doc's "Checking it" curl lines give what the doc says: 404 for the prefix, 204 for a preflight."""
    need_program("curl")
    script = fill(snippet("reverse-proxy.md", "proxy-check"), {"https://share.example.org": nginx.url})
    out = subprocess.run(["bash", "-eu", "-c", script], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, CURL_CA_BUNDLE=str(tls.cert)))
    assert out.returncode == 0, out.stderr
    assert [line.split()[1] for line in out.stdout.splitlines()] == ["404", "204"], out.stdout


def test_haproxy_doc_config_proxies_signed_upload(haproxy: Front, tls: Tls) -> None:
    check_through_proxy(haproxy, tls, "haproxy Bild (ä).png")


def test_forwarded_for_from_untrusted_peer_is_ignored(hmacfs: HmacfsProcess) -> None:
    """A client talking to hmacfs directly cannot pick its logged address with the header."""
    name = "direct.png"
    reply = httpraw.request("PUT", hmacfs.base_url + signed_path(hmacfs, name), BODY,
                            {"X-Forwarded-For": CLIENT, "Forwarded": f"for={CLIENT}"},
                            source_address=("127.0.0.77", 0))
    assert reply.status == 201, (reply.status, reply.body[:200])
    assert access_clients(hmacfs, "PUT", name) == ["127.0.0.77"], hmacfs.log()[-3000:]


def test_denyips_applies_to_the_client_behind_nginx(nginx: Front, tls: Tls) -> None:
    """The forwarded address is what access rules see: a denied client is refused through the proxy."""
    name = "denied.png"
    reply = httpraw.request("PUT", nginx.url + signed_path(nginx.hm, name), BODY,
                            {"Content-Type": "image/png"}, context=tls.context, source_address=(DENIED_CLIENT, 0))
    assert reply.status == 403, (reply.status, reply.body[:200])
    assert not (nginx.hm.storage / "proxy" / name).exists()


# --- Resumable uploads through the proxies ----------------------------------------------
#
# tus and the IETF draft's creation by POST are plain request/response. Apple's IETF PUT
# (`Upload-Draft-Interop-Version` + `Upload-Complete: ?1`) is resumable only through an
# interim `104 Upload Resumption Supported` (with the upload's Location) sent before hmacfs
# reads the body. A proxy must forward it as an interim response (RFC 9110, 15.2): HAProxy
# does, so the doc has hmacfs send it there (`interimresponses = "always"`); nginx takes it
# for the final response, so with the default ("direct") hmacfs sends none to a trusted
# proxy and serves the PUT as an ordinary one (docs/reverse-proxy.md, "Resumable uploads").

IETF = {"Upload-Draft-Interop-Version": "6"}
PARTIAL = {**IETF, "Content-Type": "application/partial-upload"}


@dataclass
class WireReply:
    """One response as it came off the wire (an interim one has no body)."""

    status: int
    head: bytes  # status line and fields, as received
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


class Wire:
    """A raw HTTP/1.1 connection to a proxy's TLS port.

    http.client takes any 1xx but 100 for the final response and cannot stop halfway through a
    body, so the resumable-upload checks write the request bytes themselves and read responses
    one at a time, interim ones included, keeping each head as it came.
    """

    def __init__(self, port: int, tls: Tls, timeout: float = 10.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls.context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def send_head(self, method: str, target: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: share.example.org", *(f"{n}: {v}" for n, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout as err:  # TimeoutError from 3.10 on
            raise AssertionError(f"no (more of a) response from the proxy within {self.sock.gettimeout()} s; "
                                 f"unparsed: {self.buffer[:300]!r}") from err
        if not chunk:
            raise ConnectionError(f"the proxy closed the connection; unparsed: {self.buffer[:300]!r}")
        self.buffer += chunk

    def response(self, method: str) -> WireReply:
        """The next response on the connection, interim or final; a final one must be framed by
        Content-Length (the proxies' choice for hmacfs's answers), and its body is read."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *fields = head.decode("latin-1").split("\r\n")
        headers = {n.strip().lower(): v.strip() for n, v in (f.split(":", 1) for f in fields)}
        reply = WireReply(int(status_line.split(" ", 2)[1]), head, headers)
        if reply.status < 200 or reply.status in (204, 304) or method == "HEAD":
            return reply
        assert "transfer-encoding" not in headers, head
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        reply.body, self.buffer = self.buffer[:length], self.buffer[length:]
        return reply

    def responses(self, method: str) -> tuple[list[WireReply], WireReply]:
        """The interim responses up to the final one, and the final one."""
        interims = []
        while (reply := self.response(method)).status < 200:
            interims.append(reply)
        return interims, reply

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def slot(hm: HmacfsProcess, name: str, size: int) -> str:
    """A v1-signed upload URL path+query for `proxy/<name>` (an ASCII name)."""
    path = f"proxy/{name}"
    return f"{hm.prefix}{path}?v={httpraw.mac(hm.secret, f'{path} {size}')}"


def ietf_put_head(wire: Wire, target: str, size: int) -> None:
    """Send the head of an IETF complete PUT, as Apple's URLSession does for an upload task."""
    wire.send_head("PUT", target, {"Content-Length": str(size), "Content-Type": "application/octet-stream",
                                   **IETF, "Upload-Complete": "?1"})


def draft_fields(reply: WireReply) -> dict[str, str]:
    """The resumable-upload fields of a response (none on an ordinary PUT's answer)."""
    return {n: v for n, v in reply.headers.items() if n.startswith("upload-")}


def check_interim_104(reply: WireReply, hm: HmacfsProcess) -> str:
    """`reply` is hmacfs's 104 for a creation; returns the upload's URL path."""
    assert reply.status == 104, reply.head
    assert reply.headers["location"].startswith(f"{hm.prefix}.uploads/"), reply.head
    assert reply.headers["upload-draft-interop-version"] == "6", reply.head
    return reply.headers["location"]


def test_nginx_ietf_put_is_a_plain_put_on_a_kept_connection(nginx: Front, tls: Tls) -> None:
    """Behind nginx an IETF PUT gets no 104: the client sends its body, the first response is a
    plain 201 (no draft fields) framed by nginx on a connection that stays usable."""
    hm, name = nginx.hm, "ietf-nginx.bin"
    with Wire(nginx.port, tls) as wire:
        ietf_put_head(wire, slot(hm, name, len(BODY)), len(BODY))
        wire.send(BODY)
        final = wire.response("PUT")
        assert final.status == 201, final.head
        assert draft_fields(final) == {}, final.head
        assert "close" not in final.headers.get("connection", "").lower(), final.head
        wire.send_head("GET", f"{hm.prefix}proxy/{name}", {})
        again = wire.response("GET")
        assert again.status == 200 and again.body == BODY, again.head
    assert (hm.storage / "proxy" / name).read_bytes() == BODY


def test_haproxy_ietf_put_gets_104_then_201_on_a_kept_connection(haproxy: Front, tls: Tls) -> None:
    """Behind HAProxy (interimresponses = "always") the 104 reaches the client before it sends the
    body, the 201 is the final response framed by HAProxy (no `Connection: close`), and a second
    request follows on the connection."""
    hm, name = haproxy.hm, "ietf-haproxy.bin"
    with Wire(haproxy.port, tls) as wire:
        ietf_put_head(wire, slot(hm, name, len(BODY)), len(BODY))
        check_interim_104(wire.response("PUT"), hm)
        wire.send(BODY)
        final = wire.response("PUT")
        assert final.status == 201, final.head
        assert final.headers["upload-complete"] == "?1", final.head
        assert final.headers["location"] == f"{hm.prefix}proxy/{name}", final.head
        assert "close" not in final.headers.get("connection", "").lower(), final.head
        wire.send_head("GET", f"{hm.prefix}proxy/{name}", {})
        again = wire.response("GET")
        assert again.status == 200 and again.body == BODY, again.head
    assert (hm.storage / "proxy" / name).read_bytes() == BODY


@pytest.mark.parametrize(("front", "interims"), [("nginx", []), ("haproxy", [104])])
def test_ietf_put_streams_past_a_backend_pause(front: str, interims: list[int], request: pytest.FixtureRequest,
                                               tls: Tls) -> None:
    """hmacfs stops reading for half a second (a busy disk) while a 16 MB IETF PUT streams in: the
    proxy must go on forwarding the body once hmacfs reads again (nginx after a 104 would not),
    and the first response after the body is the 201."""
    f: Front = request.getfixturevalue(front)
    hm, name = f.hm, f"ietf-pause-{front}.bin"
    assert hm.proc is not None
    body = os.urandom(16 * 1024 * 1024)
    first = 1024 * 1024
    with Wire(f.port, tls, timeout=8.0) as wire:
        ietf_put_head(wire, slot(hm, name, len(body)), len(body))
        if interims:
            check_interim_104(wire.response("PUT"), hm)
        wire.send(body[:first])
        os.kill(hm.proc.pid, signal.SIGSTOP)
        resume = threading.Timer(0.5, os.kill, (hm.proc.pid, signal.SIGCONT))
        resume.start()
        try:
            wire.send(body[first:])
            final = wire.response("PUT")
        except socket.timeout as err:  # TimeoutError from 3.10 on: sending blocked
            raise AssertionError(f"the proxy stopped forwarding the body ({err})") from err
        finally:
            resume.join()
            os.kill(hm.proc.pid, signal.SIGCONT)
        assert final.status == 201, final.head
    assert (hm.storage / "proxy" / name).read_bytes() == body


@pytest.mark.parametrize(("front", "statuses"), [("nginx_h2", ["201"]), ("haproxy", ["104", "201"])])
def test_ietf_put_over_http2_with_curl(front: str, statuses: list[str], request: pytest.FixtureRequest,
                                       tls: Tls, tmp_path: Path) -> None:
    """Browsers and Apple's URLSession speak HTTP/2 when the proxy offers it (the doc's HAProxy bind
    line does; nginx with `http2` on its listen lines): curl sees the 104 then the 201 through
    HAProxy, a plain 201 through nginx, and the upload is stored either way."""
    need_program("curl")
    f: Front = request.getfixturevalue(front)
    hm, name = f.hm, f"ietf-h2-{front}.bin"
    (tmp_path / "body").write_bytes(BODY)
    out = subprocess.run(["curl", "-sS", "-v", "--http2", "--cacert", str(tls.cert), "-X", "PUT",
                          "--data-binary", f"@{tmp_path / 'body'}", "-H", "Content-Type: application/octet-stream",
                          "-H", "Upload-Draft-Interop-Version: 6", "-H", "Upload-Complete: ?1",
                          "-o", os.devnull, "-w", "%{http_code}", "--max-time", "30",
                          f"{f.url}{slot(hm, name, len(BODY))}"],
                         capture_output=True, text=True, timeout=60)
    seen = [line.split()[2] for line in out.stderr.splitlines() if line.startswith("< HTTP/2 ")]
    assert out.returncode == 0 and out.stdout == "201", (out.returncode, out.stdout, out.stderr[-1500:])
    assert seen == statuses, out.stderr[-1500:]
    assert (hm.storage / "proxy" / name).read_bytes() == BODY


def test_ietf_put_broken_off_resumes_through_haproxy(haproxy: Front, tls: Tls) -> None:
    """The connection breaks after half the body; the client asks the upload (the 104's Location)
    for its offset and appends the rest (Apple's URLSession resuming an upload task)."""
    hm, name = haproxy.hm, "ietf-resumed-haproxy.bin"
    half = len(BODY) // 2
    with Wire(haproxy.port, tls) as wire:
        ietf_put_head(wire, slot(hm, name, len(BODY)), len(BODY))
        upload = check_interim_104(wire.response("PUT"), hm)
        wire.send(BODY[:half])
        time.sleep(0.3)  # let the proxy pass the half on before the connection breaks (FIN)
    head = httpraw.request("HEAD", haproxy.url + upload, headers=IETF, context=tls.context)
    assert head.status == 204, (head.status, dict(head.headers))
    assert head.headers["Upload-Complete"] == "?0" and head.headers["Upload-Length"] == str(len(BODY))
    offset = int(head.headers["Upload-Offset"])
    assert 0 < offset <= half, (offset, half)
    patch = httpraw.request("PATCH", haproxy.url + upload, BODY[offset:],
                            {**PARTIAL, "Upload-Offset": str(offset), "Upload-Complete": "?1"}, context=tls.context)
    assert patch.status == 201, (patch.status, patch.body[:300])
    assert patch.headers["Location"] == f"{hm.prefix}proxy/{name}" and patch.headers["ETag"]
    got = httpraw.request("GET", haproxy.url + patch.headers["Location"], context=tls.context)
    assert got.status == 200 and got.body == BODY


@pytest.mark.parametrize(("front", "interims"), [("nginx", []), ("haproxy", [104])])
def test_ietf_post_creation_resumes_through_proxy(front: str, interims: list[int], request: pytest.FixtureRequest,
                                                  tls: Tls) -> None:
    """The IETF flow that works behind any proxy: creation by POST (`Upload-Complete: ?0` with
    `Upload-Length`; its 201 carries the Location), a PATCH of half, a PATCH broken off midway,
    HEAD for the offset, a PATCH of the rest; the file is the one sent. No 104 reaches an nginx
    client; a HAProxy client gets it before the 201."""
    f: Front = request.getfixturevalue(front)
    hm, name = f.hm, f"ietf-post-{front}.bin"
    size, half, quarter = len(BODY), len(BODY) // 2, len(BODY) // 4
    with Wire(f.port, tls) as wire:
        wire.send_head("POST", slot(hm, name, size), {**IETF, "Upload-Complete": "?0", "Upload-Length": str(size),
                                                      "Content-Length": "0"})
        early, created = wire.responses("POST")
    assert [r.status for r in early] == interims, [r.head for r in early]
    assert created.status == 201, (created.head, created.body[:300])
    assert created.headers["upload-complete"] == "?0" and created.headers["upload-offset"] == "0", created.head
    upload = created.headers["location"]
    assert upload.startswith(f"{hm.prefix}.uploads/"), created.head
    assert [check_interim_104(r, hm) for r in early] == [upload] * len(early)

    first = httpraw.request("PATCH", f.url + upload, BODY[:half],
                            {**PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?0"}, context=tls.context)
    assert first.status == 204 and first.headers["Upload-Offset"] == str(half), (first.status, first.body[:300])
    with Wire(f.port, tls) as wire:  # the rest, but the connection breaks after a quarter of the file
        wire.send_head("PATCH", upload, {**PARTIAL, "Upload-Offset": str(half), "Upload-Complete": "?1",
                                         "Content-Length": str(size - half)})
        wire.send(BODY[half:half + quarter])
        time.sleep(0.3)  # let the proxy pass the bytes on before the connection breaks (FIN)
    head = httpraw.request("HEAD", f.url + upload, headers=IETF, context=tls.context)
    assert head.status == 204, (head.status, dict(head.headers))
    assert head.headers["Upload-Complete"] == "?0" and head.headers["Upload-Length"] == str(size)
    offset = int(head.headers["Upload-Offset"])
    assert half < offset <= half + quarter, (offset, half, quarter)
    rest = httpraw.request("PATCH", f.url + upload, BODY[offset:],
                           {**PARTIAL, "Upload-Offset": str(offset), "Upload-Complete": "?1"}, context=tls.context)
    assert rest.status == 201, (rest.status, rest.body[:300])
    assert rest.headers["Location"] == f"{hm.prefix}proxy/{name}" and rest.headers["ETag"]
    got = httpraw.request("GET", f.url + rest.headers["Location"], context=tls.context)
    assert got.status == 200 and got.body == BODY


@pytest.mark.parametrize("front", ["haproxy", "nginx"])
def test_tus_upload_through_proxy(front: str, request: pytest.FixtureRequest, tls: Tls) -> None:
    """tus creation (POST), two PATCHes and a HEAD in between pass the doc's proxy configs as they are."""
    f: Front = request.getfixturevalue(front)
    hm, name = f.hm, f"tus-{front}.bin"
    tus = {"Tus-Resumable": "1.0.0"}
    half = len(BODY) // 2
    created = httpraw.request("POST", f.url + slot(hm, name, len(BODY)), b"",
                              {**tus, "Upload-Length": str(len(BODY))}, context=tls.context)
    assert created.status == 201, (created.status, created.body[:300])
    upload = created.headers["Location"]
    assert upload.startswith(f"{hm.prefix}.uploads/") and created.headers["Tus-Resumable"] == "1.0.0"
    chunk = {**tus, "Content-Type": "application/offset+octet-stream"}
    first = httpraw.request("PATCH", f.url + upload, BODY[:half], {**chunk, "Upload-Offset": "0"},
                            context=tls.context)
    assert first.status == 204 and first.headers["Upload-Offset"] == str(half), (first.status, first.body[:300])
    head = httpraw.request("HEAD", f.url + upload, headers=tus, context=tls.context)
    assert head.status == 200, head.status
    assert (head.headers["Upload-Offset"], head.headers["Upload-Length"]) == (str(half), str(len(BODY)))
    rest = httpraw.request("PATCH", f.url + upload, BODY[half:], {**chunk, "Upload-Offset": str(half)},
                           context=tls.context)
    assert rest.status == 204 and rest.headers["Upload-Offset"] == str(len(BODY)), (rest.status, rest.body[:300])
    got = httpraw.request("GET", f"{f.url}{hm.prefix}proxy/{name}", context=tls.context)
    assert got.status == 200 and got.body == BODY


def test_nginx_not_in_trustedproxies_takes_the_104_for_the_final_response(nginx_untrusted: Front,
                                                                          tls: Tls) -> None:
    """The doc's warning: when hmacfs does not list nginx in trustedproxies it cannot know it is
    behind nginx and sends the 104; nginx hands it to the client as its final response and pipes
    hmacfs's real 201 after it as unframed bytes. (If this ever fails, nginx has learnt to forward
    1xx responses and the doc's warning needs revisiting.)"""
    hm, name = nginx_untrusted.hm, "ietf-untrusted.bin"
    small = BODY[:64 * 1024]  # well below where nginx stops forwarding the body
    with Wire(nginx_untrusted.port, tls, timeout=5.0) as wire:
        ietf_put_head(wire, slot(hm, name, len(small)), len(small))
        taken = wire.response("PUT")
        assert taken.status == 104, taken.head
        # nginx's own head (nginx never passes a backend's Server field), as for a final response
        assert taken.headers.get("server", "").startswith("nginx"), taken.head
        assert taken.headers["location"].startswith(f"{hm.prefix}.uploads/"), taken.head
        wire.send(small)
        piped = wire.response("PUT")  # the bytes after it: hmacfs's own 201, head and all
    assert piped.status == 201 and piped.headers.get("server") == "hmacfs", piped.head
    assert piped.headers.get("connection") == "close", piped.head
    assert (hm.storage / "proxy" / name).read_bytes() == small
