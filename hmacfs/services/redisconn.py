"""The Redis connection of cluster mode, its health check, and a lease for one-node-at-a-time work.

Strategy: redis-py is an optional package, imported only when `[redis] redisenabled` is on
(a clear start-up error says how to install it otherwise). The client is built with
short socket timeouts and no back-off, so a Redis that went away costs a request at most
a few seconds and a 503 (meta/redis.py turns its errors into one), and it reconnects by itself
when Redis returns: nothing here has to be restarted. The health check pings every
`redishealthcheckinterval` and exports `hmacfs_redis_up`; /ready reads the same flag.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

from ..errors import StartupError
from .periodic import run_every

log = logging.getLogger("hmacfs")
SOCKET_TIMEOUT = 3.0   # a hung Redis costs a request this long, then a 503
CONNECT_TIMEOUT = 2.0


def parse_redis_address(addr: str, db: int = 0) -> dict[str, Any]:
    """redis.Redis keyword arguments for `redisaddr`: "host:port", "[v6]:port", "unix:/path",
    or a URL "redis://[:password@]host[:port][/db]" / "rediss://..." (TLS, certificates
    checked). A db in the URL wins over `redisdbindex`. ValueError says what is wrong."""
    if db < 0:
        raise ValueError(f"db index {db}: must be 0 or more")
    if addr.startswith("unix:"):
        path = addr[5:].lstrip("/")
        if not path:
            raise ValueError("unix: needs a socket path")
        return {"unix_socket_path": "/" + path, "db": db}
    if "://" in addr:
        parts = urlsplit(addr)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"scheme {parts.scheme!r}: expected redis:// or rediss://")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("the port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError("no host")
        kwargs: dict[str, Any] = {"host": parts.hostname, "port": port, "db": db}
        path = parts.path.strip("/")
        if path:
            if not path.isdigit() or len(path) > 5:
                raise ValueError(f"database {path!r}: a number")
            kwargs["db"] = int(path)
        if parts.password is not None:
            kwargs["password"] = unquote(parts.password)
        if parts.username:
            kwargs["username"] = unquote(parts.username)
        if parts.scheme == "rediss":
            kwargs["ssl"] = True
            kwargs["ssl_cert_reqs"] = "required"
        return kwargs
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host:
        raise ValueError("expected host:port, [v6]:port, unix:/path or a redis:// URL")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r}: a number from 1 to 65535")
    return {"host": host, "port": int(port_text), "db": db}


def connect(addr: str, db: int, password: str = "", ca_file: str = "") -> Any:
    """A redis.Redis client for the configured server (not yet connected: redis-py connects
    on first use, and again after every failure)."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise StartupError("[redis] redisenabled = true needs the redis package (redis-py): "
                           "pip install redis, or apt install python3-redis") from None
    kwargs = parse_redis_address(addr, db)
    if password and "password" not in kwargs:
        kwargs["password"] = password
    if ca_file and kwargs.get("ssl"):
        kwargs["ssl_ca_certs"] = ca_file  # a private CA; the host name is still checked
    # One immediate retry, and only of a broken connection (a pooled socket Redis closed when it
    # restarted); never of a timeout. redis-py's default retries with back-off for about a
    # minute against a hung Redis, and a request would wait all that time for its 503.
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
    return redis.Redis(socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT,
                       health_check_interval=30, retry=retry, **kwargs)


class RedisHealth:
    """Pings Redis every `interval` seconds in a thread; `up` is what the last ping said."""

    def __init__(self, client: Any, interval: float, on_change: Optional[Callable[[bool], None]] = None) -> None:
        self.client = client
        self.interval = interval
        self.on_change = on_change
        self.up: Optional[bool] = None  # None: not checked yet
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def check(self) -> bool:
        try:
            up = bool(self.client.ping())
        except Exception as e:
            up = False
            if self.up is not False:  # the first failure says why (a refused certificate, a wrong password)
                log.error("redis: unreachable (%s); requests that need shared state get 503 until it is back", e)
        else:
            if not self.up:
                log.info("redis: reachable")
        if up != bool(self.up) and self.on_change is not None:
            self.on_change(up)
        self.up = up
        return up

    def start(self) -> None:
        self.check()
        self._thread = run_every(self.interval, self.check, "redis-health", self._stop, failure="redis health check")

    def stop(self) -> None:
        self._stop.set()


RENEW_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    """A named lease in Redis: at most one node holds it; it lapses `ttl` seconds after its
    holder stops renewing (a node that died frees it by itself). The janitor takes it before
    each pass, so expiry and sweeps run once in the cluster, not once per node."""

    def __init__(self, client: Any, key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1000, int(ttl * 1000))
        self.token = secrets.token_hex(16)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    def acquire(self) -> bool:
        """Take or renew the lease; False when another node holds it (or Redis is away)."""
        try:
            if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
                return True
            return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except Exception as e:
            log.warning("redis: lease %s not taken (%s)", self.key, e)
            return False

    def release(self) -> None:
        try:
            self._release(keys=[self.key], args=[self.token])
        except Exception as e:
            log.debug("redis: lease %s not released (%s); it lapses by itself", self.key, e)

    def holder(self) -> Optional[str]:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value


def wait_until_up(health: RedisHealth, timeout: float) -> bool:
    """Ping until Redis answers or `timeout` passes (start-up waits a little for a Redis
    started at the same moment, and then goes on: requests get 503 until it is there)."""
    deadline = time.monotonic() + timeout
    while not health.check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True
