"""The processes and clients of bench/cluster.py: hmacfs nodes, nginx as the load balancer, wrk,
and the S3-side helpers (a raw signed client for the ceilings, a discarding sink for boto3).

Strategy: reuse what the other benchmarks start and how (bench/servers.py: one process group
per server, fresh loopback ports, /health readiness, SIGTERM then SIGKILL; storage.py's
ConfiguredHmacfs: the zipapp with bench/servers.py's TOML), and start moto and redis-server
exactly as the tests do (tests/support/s3server.py, tests/support/redisserver.py: no pytest in
them). What is new here is only the configuration: a node is bench/servers.py's hmacfs plus
`[storage] backend = "s3"` (or the local backend) and `[redis]`, and the
balancer is one nginx with one listening port per upstream set, so every arrangement runs side
by side and rounds can interleave them.
"""
from __future__ import annotations

import os
import resource
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

import clients
import servers
import storage

UPLOADS_LINE = 'maxuploadsize = "20GB"\n'  # servers.Hmacfs writes it; the part size goes beside it


class Node(storage.ConfiguredHmacfs):
    """One cluster node: bench/servers.py's hmacfs config, `[uploads] chunksize` (the S3 part
    size), `[storage]` and `[redis]`."""

    def __init__(self, name: str, workdir: Path, pyz: Path, python: str, chunksize: int, extra_toml: str) -> None:
        super().__init__(name, workdir, pyz, python, extra_toml)
        self.chunksize = chunksize

    def configure(self) -> None:
        super().configure()
        text = self.config_path.read_text()
        if UPLOADS_LINE not in text:
            raise RuntimeError(f"servers.Hmacfs no longer writes {UPLOADS_LINE.strip()!r}; update cluster_setup.Node")
        self.config_path.write_text(text.replace(UPLOADS_LINE, f"{UPLOADS_LINE}chunksize = {self.chunksize}\n"))


def s3_toml(endpoint: str, bucket: str, access_key: str, secret_key: str, concurrency: int) -> str:
    return ("[storage]\nbackend = \"s3\"\n"
            f's3endpoint = "{endpoint}"\ns3bucket = "{bucket}"\n'
            f's3accesskey = "{access_key}"\ns3secretkey = "{secret_key}"\n'
            f"s3partconcurrency = {concurrency}\n")


def redis_toml(port: int, prefix: str) -> str:
    return f'[redis]\nredisenabled = true\nredisaddr = "127.0.0.1:{port}"\nrediskeyprefix = "{prefix}"\n'


NGINX_HEAD = """\
# bench/cluster.py: nginx as the cluster's load balancer, one port per upstream set.
{user}worker_processes {workers};
worker_rlimit_nofile 8192;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_max_body_size 0;
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
"""

NGINX_SITE = """\
    upstream {name} {{
{members}        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
"""


class Balancer(servers.Nginx):
    """Debian nginx (round robin, keep-alive to the upstreams) with one listening port per named
    upstream set; `ports[name]`. Start it after the nodes: readiness is /health through the first."""

    name = "nginx"

    def __init__(self, workdir: Path, sets: dict[str, list[servers.Server]], workers: int = 1) -> None:
        super().__init__(workdir)
        self.sets = sets
        self.workers = workers
        self.ports: dict[str, int] = {}

    def configure(self) -> None:
        self.ports = {name: servers.free_port() for name in self.sets}
        self.port = next(iter(self.ports.values()))
        user = "user root root;\n" if os.geteuid() == 0 else ""
        text = NGINX_HEAD.format(user=user, workers=self.workers, prefix=self.workdir)
        for name, members in self.sets.items():
            lines = "".join(f"        server 127.0.0.1:{m.port};\n" for m in members)
            text += NGINX_SITE.format(name=name.replace("-", "_"), members=lines, port=self.ports[name])
        self.conf.write_text(text + "}\n")
        self.make_temp_dirs()


def tree_cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU so far of `pid` and its live descendants (nginx: master + workers)."""
    if pid is None:
        return 0.0
    total = 0
    for p in servers.process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU of the children this process has reaped (wrk: measured around each run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------- wrk


def wrk(port: int, target: str, conns: int, duration: float, headers: tuple[str, ...] = ()) -> dict:
    """One wrk run (2 threads, keep-alive, bench/wrk_get.lua's JSON summary) on 127.0.0.1:`port`;
    returns that summary plus req/s. `headers` are sent with every request (-H)."""
    cmd = ["wrk", "-t", "2", "-c", str(conns), "-d", f"{duration:g}s", "--timeout", "10s",
           "-s", str(servers.BENCH / "wrk_get.lua")]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(f"http://{clients.HOST}:{port}{target}")
    return clients.wrk_summary(cmd, duration)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None and shutil.which("nginx") is not None


# ----------------------------------------------------------------------------- S3 side


def signed_headers(endpoint: str, region: str, access_key: str, secret_key: str, method: str,
                   path: str) -> dict[str, str]:
    """SigV4 headers for `method` `path` on `endpoint` with an unsigned payload, made by botocore's
    signer (not hmacfs's: a ceiling must not depend on the code under test)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=endpoint + path, headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    SigV4Auth(Credentials(access_key, secret_key), "s3", region).add_auth(request)
    return {k: v for k, v in request.headers.items() if k.lower() != "host"}


def raw_put(port: int, path: str, headers: dict[str, str], src: Path, timeout: float) -> clients.Result:
    """The minimal client's PUT: one request, the body by sendfile (bench/clients.put_file)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return clients.put_file(port, path, src, timeout=timeout, extra_headers=extra)


def raw_get(port: int, path: str, headers: dict[str, str], timeout: float) -> clients.Result:
    """The minimal client's GET: one request, the body spliced to /dev/null as clients.get_file does."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    t0 = time.perf_counter()
    with socket.create_connection((clients.HOST, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {clients.HOST}:{port}\r\n{extra}Connection: close\r\n\r\n"
                     .encode())
        status, head, rest = clients.read_head(sock)
        if clients.SPLICE and "content-length" in head:
            nbytes = clients._splice_drain(sock, int(head["content-length"]), len(rest), timeout)
        else:
            nbytes = clients._drain(sock, head, len(rest), memoryview(bytearray(clients.RECV_BUF)))
    return clients.Result(status, nbytes, time.perf_counter() - t0)


class Sink:
    """A seekable file object that keeps nothing, for boto3's download_fileobj: s3transfer writes
    each part at its offset (seek + write), so this records the spans to prove that every byte
    arrived exactly once, and nothing is copied to a file (hmacfs's GET goes to /dev/null too)."""

    def __init__(self) -> None:
        self.pos = 0
        self.spans: list[tuple[int, int]] = []

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.end() + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: bytes) -> int:
        n = len(data)
        self.spans.append((self.pos, n))
        self.pos += n
        return n

    def end(self) -> int:
        return max((a + n for a, n in self.spans), default=0)

    def problem(self, size: int) -> Optional[str]:
        """None when the writes cover 0..size exactly once, else what is wrong."""
        at = 0
        for start, n in sorted(self.spans):
            if n == 0:
                continue
            if start != at:
                return f"bytes {at:,}..{start:,} {'missing' if start > at else 'written twice'}"
            at += n
        return None if at == size else f"{at:,} bytes written instead of {size:,}"
