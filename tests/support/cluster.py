"""Several hmacfs nodes as one service: one moto S3 (signatures checked), one Redis, N nodes
sharing both, and Debian's nginx in front as the load balancer. Everything on 127.0.0.1.

Strategy: the cluster tests talk to real processes only, as an operator's load balancer and
clients would. `Backing` owns the two shared engines (moto with auth on, Redis with
appendonly so a `restart()` keeps the data); several `Cluster`s may share one Backing, each
with a bucket of its own (created here with boto3) and its own `rediskeyprefix`, which keeps
start-up cost small. (Not an `s3prefix` each: hmacfs lists its prefix, which ends in `/`, and
moto 5.2 refuses signed list requests whose prefix holds a `/`.) A test that kills or
restarts something takes a Backing and Cluster of its own.

Nodes all list 127.0.0.1 in `trustedproxies`: nginx's `X-Forwarded-For` (and a test's own,
sent straight to a node) names the client address. Every wait is bounded; `close()` stops
every process even after a failure (each in its own process group, stopped by its pid).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from .hmacfs_proc import HmacfsProcess, free_port, merge
from .redisserver import RedisServer
from .s3server import MotoS3

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def wait_until(predicate, what: str, timeout: float = 10.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Backing:
    """The shared engines: moto S3 (auth on) and Redis (appendonly)."""

    def __init__(self, workdir: Path, auth: bool = True) -> None:
        self.workdir = Path(workdir)
        self.auth = auth  # False: a moto that checks nothing (it answers 500 to presigned URLs with auth on)
        self.s3: Optional[MotoS3] = None
        self.redis: Optional[RedisServer] = None

    def start(self) -> Backing:
        try:
            self.s3 = MotoS3(self.workdir / "moto", auth=self.auth).start()
            self.redis = RedisServer(self.workdir / "redis", appendonly=True).start()
        except BaseException:
            self.close()
            raise
        return self

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object under `prefix` in `bucket` (boto3, paginated)."""
        client = self.s3.s3()
        out: list[str] = []
        token: dict[str, str] = {}
        while True:
            page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **token)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def multipart_uploads(self, bucket: str) -> list[dict]:
        """Multipart uploads begun and neither completed nor aborted."""
        return self.s3.s3().list_multipart_uploads(Bucket=bucket).get("Uploads", [])

    def get_object(self, bucket: str, key: str) -> bytes:
        return self.s3.s3().get_object(Bucket=bucket, Key=key)["Body"].read()

    def close(self) -> None:
        try:
            if self.redis is not None:
                self.redis.stop()
        finally:
            if self.s3 is not None:
                self.s3.stop()


class Nginx:
    """Debian's nginx, unprivileged in a temp dir, with an upstream of the nodes."""

    def __init__(self, workdir: Path, upstreams: list[int]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.upstreams = upstreams
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> str:
        w = self.workdir
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in self.upstreams)
        temps = "\n".join(f"    {k}_temp_path {w / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""# hmacfs cluster tests: nginx as the load balancer
user root;
daemon off;
worker_processes 1;
pid {w / "nginx.pid"};
error_log {w / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {w / "access.log"};
{temps}
    upstream hmacfs {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://hmacfs;
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""

    def start(self) -> Nginx:
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        base = [NGINX, "-p", str(self.workdir), "-e", str(self.workdir / "error.log"), "-c", str(conf)]
        checked = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t: {checked.stderr}")
        self.proc = subprocess.Popen(base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: _port_open(self.port) or self.proc.poll() is not None, "nginx to listen")
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.error_log()[-2000:]}")
        except BaseException:
            self.stop()
            raise
        return self

    def error_log(self) -> str:
        try:
            return (self.workdir / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def access_log(self) -> str:
        try:
            return (self.workdir / "access.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Cluster:
    """N hmacfs nodes on one Backing, nginx in front. `nodes[i]` are HmacfsProcess objects
    (same secret, bucket, Redis); `lb` is an object with `.port`/`.prefix`/`.secret` for the
    test clients, pointing at nginx."""

    def __init__(self, workdir: Path, backing: Backing, config: Optional[dict[str, Any]] = None,
                 n: int = 2, name: str = "c", nginx: bool = True) -> None:
        self.workdir = Path(workdir)
        self.backing = backing
        self.name = name
        self.bucket = f"hmacfs-{name}"
        self.keyprefix = f"hmacfs-{name}:"
        s3, redis = backing.s3, backing.redis
        base = {
            "server": {"trustedproxies": ["127.0.0.1/32"]},
            "storage": {"backend": "s3", "s3endpoint": s3.endpoint, "s3bucket": self.bucket,
                        "s3accesskey": s3.access_key, "s3secretkey": s3.secret_key},
            "redis": {"redisenabled": True, "redisaddr": f"127.0.0.1:{redis.port}",
                      "rediskeyprefix": self.keyprefix},
        }
        self.config = merge(base, config or {})
        self.nodes = [HmacfsProcess(self.workdir / f"node{i}", self.config) for i in range(n)]
        self.nginx: Optional[Nginx] = Nginx(self.workdir / "nginx", [p.port for p in self.nodes]) if nginx else None

    def start(self) -> Cluster:
        try:
            self.backing.s3.s3().create_bucket(Bucket=self.bucket)
            for node in self.nodes:
                node.start(timeout=30)
            if self.nginx is not None:
                self.nginx.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def a(self) -> HmacfsProcess:
        return self.nodes[0]

    @property
    def b(self) -> HmacfsProcess:
        return self.nodes[1]

    @property
    def lb(self) -> LoadBalancer:
        assert self.nginx is not None
        return LoadBalancer(self.nginx.port, self.a.prefix, self.a.secret)

    def objects(self, kind: str = "") -> list[str]:
        """Keys in the cluster's bucket, optionally of one kind (`object.`, `blob.`, `partial.`)."""
        return self.backing.keys(self.bucket, kind)

    def multipart_uploads(self) -> list[dict]:
        return self.backing.multipart_uploads(self.bucket)

    def get_object(self, key: str) -> bytes:
        return self.backing.get_object(self.bucket, key)

    def logs(self) -> str:
        return "\n".join(f"--- node{i} ---\n{n.log()[-4000:]}" for i, n in enumerate(self.nodes))

    def close(self) -> None:
        try:
            if self.nginx is not None:
                self.nginx.stop()
        finally:
            for node in self.nodes:
                try:
                    node.close()
                except Exception:  # stop the others whatever one did
                    node.kill()


class LoadBalancer:
    """What the test clients need of a server (`port`, `prefix`, `secret`), for nginx."""

    def __init__(self, port: int, prefix: str, secret: str) -> None:
        self.port = port
        self.prefix = prefix
        self.secret = secret
        self.host = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
