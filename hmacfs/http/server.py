"""The server process: listeners, connection limits, deadlines, signals and graceful drain.

Strategy: `ThreadingHTTPServer` gives each connection a thread. On top of it:
- a connection table caps open connections (`maxconnections`, then a canned 503) and
  holds each connection's deadline; a watchdog thread shuts down sockets past it, which
  bounds slow-header and slow-body clients that per-recv timeouts alone cannot;
- SIGTERM stops accepting, closes idle keep-alive connections, lets in-flight transfers
  finish for up to `timeouts.shutdown`, then exits 0; SIGHUP reopens the log file (logrotate)
  and reloads secrets and log level;
- under systemd: listening sockets may be inherited (socket activation) and readiness,
  reload and stop are reported over NOTIFY_SOCKET (services/systemd.py).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Optional, Sequence

from .. import config as config_mod
from ..app import App
from ..config import Config, ListenAddress
from ..errors import HTTPError
from ..handlers.service import handle_health, handle_metrics
from ..services import systemd
from ..services.logs import AccessLog, reopen_logs, set_level
from ..services.netevents import AddressEvent, AddressWatcher, answers, same_address
from .clientaddr import Network, in_networks, parse_networks, peer_key
from .connection import ConnectionHandler
from .exchange import refusal
from .router import Router

log = logging.getLogger("hmacfs")
TOO_MANY = HTTPError(503, "too many connections", {"Retry-After": "5"})
TOO_MANY_FROM_PEER = HTTPError(503, "too many connections from your address", {"Retry-After": "5"})


METRICS_CONNECTIONS = 64
DRAIN_IDLE_GRACE = 1.0  # seconds idle keep-alive connections may still bring a request when a drain begins


class ConnState:
    """One open connection: its socket, its peer, whether a request is in progress, its deadline."""

    __slots__ = ("deadline", "in_request", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: Optional[str]) -> None:
        self.sock = sock
        self.peer = peer
        self.in_request = False
        self.deadline = 0.0

    def idle(self, seconds: float) -> None:
        self.in_request = False
        self.deadline = time.monotonic() + seconds

    def busy(self, seconds: float) -> None:
        self.in_request = True
        self.deadline = time.monotonic() + seconds

    def kill(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ConnectionTable:
    """Open connections, their limits (in all and per peer address) and their deadlines.

    Admission happens in the accepting thread, atomically with the count, so a burst cannot
    overshoot a limit. The per-peer cap keeps one address (an IPv6 /64) from taking every
    connection;
    peers that are trusted proxies are exempt (all their clients arrive from them), and so
    are Unix-socket peers. `metrics=None`: not exported.
    """

    def __init__(self, limit: int, per_peer: int = 0, exempt: Sequence[Network] = (), metrics=None) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self.exempt = tuple(exempt)
        self.metrics = metrics
        self._conns: dict[socket.socket, ConnState] = {}
        self._peers: dict[str, int] = {}
        self._lock = threading.Lock()

    def _capped(self, peer: Optional[str]) -> bool:
        return bool(self.per_peer) and peer is not None and not in_networks(peer, self.exempt)

    def admit(self, sock: socket.socket, peer: Optional[str]) -> Optional[HTTPError]:
        """Register a new connection, or say why it is refused (then it is not registered)."""
        capped = self._capped(peer)
        if capped:
            assert peer is not None
            peer = peer_key(peer)  # IPv6: the /64
        with self._lock:
            if len(self._conns) >= self.limit:
                return TOO_MANY
            if capped:
                assert peer is not None
                if self._peers.get(peer, 0) >= self.per_peer:
                    return TOO_MANY_FROM_PEER
                self._peers[peer] = self._peers.get(peer, 0) + 1
            self._conns[sock] = ConnState(sock, peer if capped else None)
            self._publish()
        return None

    def claim(self, sock: socket.socket) -> ConnState:
        """The state `admit` made for this socket (a direct `serve` without admit registers it now)."""
        with self._lock:
            state = self._conns.get(sock)
            if state is None:
                state = self._conns[sock] = ConnState(sock, None)
                self._publish()
            return state

    def unregister(self, state: ConnState) -> None:
        with self._lock:
            if self._conns.pop(state.sock, None) is not None and state.peer is not None:
                left = self._peers[state.peer] - 1
                if left:
                    self._peers[state.peer] = left
                else:
                    del self._peers[state.peer]
            self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.connections.set(len(self._conns))

    def snapshot(self) -> list[ConnState]:
        with self._lock:
            return list(self._conns.values())

    def busy_count(self) -> int:
        return sum(1 for c in self.snapshot() if c.in_request)

    def reap(self, now: float) -> int:
        """Shut down connections past their deadline; returns how many."""
        overdue = [c for c in self.snapshot() if c.deadline and now > c.deadline]
        for c in overdue:
            c.kill()
        return len(overdue)

    def close_idle(self) -> None:
        for c in self.snapshot():
            if not c.in_request:
                c.kill()

    def close_all(self) -> None:
        for c in self.snapshot():
            c.kill()


class HmacfsServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on TCP (IPv4/IPv6, dual-stack for "all") or a Unix socket, or on
    a listening socket systemd passed us (socket activation; `role` picks which one)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # socketserver's 5 makes connection bursts wait in the kernel

    def __init__(self, listen: ListenAddress, app: App, router: Router, conns: ConnectionTable,
                 access_log: AccessLog, role: str = "main") -> None:
        self.app = app
        self.access_log = access_log
        self.router = router
        self.conns = conns
        self.listen = listen
        cfg = app.config
        self.timeouts = cfg.timeouts
        self.max_header_bytes = cfg.server.maxheaderbytes
        self.trusted_proxies = parse_networks(cfg.server.trustedproxies)
        self.draining = False
        self._dual_stack = False
        self.inherited = systemd.activation_socket(role)
        if self.inherited is not None:  # socket activation: systemd bound it, and owns its path
            self.address_family = self.inherited.family
            super().__init__(self.inherited.getsockname(), ConnectionHandler,  # type: ignore[arg-type]
                             bind_and_activate=False)
            self.socket.close()
            self.socket = self.inherited
            self._set_names()
            return
        if listen.unix_path:
            self.address_family = socket.AF_UNIX
            address: object = listen.unix_path
            _remove_stale_socket(listen.unix_path)
        elif ":" in listen.host:
            self.address_family = socket.AF_INET6
            address = (listen.host, listen.port)
        elif not listen.host and socket.has_ipv6:
            self.address_family = socket.AF_INET6
            self._dual_stack = True
            address = ("::", listen.port)
        else:
            self.address_family = socket.AF_INET
            address = (listen.host or "0.0.0.0", listen.port)
        super().__init__(address, ConnectionHandler, bind_and_activate=False)  # type: ignore[arg-type]
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self) -> None:
        if self._dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # socketserver's bind, not HTTPServer's: that one does a reverse DNS lookup at start.
        socketserver.TCPServer.server_bind(self)
        if self.address_family == socket.AF_UNIX:
            os.chmod(self.server_address, 0o666)
        self._set_names()

    def _set_names(self) -> None:
        if self.address_family == socket.AF_UNIX:
            self.server_name, self.server_port = "unix", 0
        else:
            self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        peer = client_address[0] if isinstance(client_address, tuple) else None
        refused = self.conns.admit(request, peer)
        if refused is not None:
            if self.conns.metrics is not None:
                self.conns.metrics.connections_refused.inc()
            try:
                request.settimeout(1.0)
                request.sendall(refusal(refused, self.app.cors))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.conns.unregister(self.conns.claim(request))
            raise

    def accept_pending(self) -> int:
        """Serve the connections waiting in the listen backlog (each gets one request and
        `Connection: close`, as the server is draining); returns how many."""
        taken = 0
        try:
            self.socket.setblocking(False)
            while True:
                try:
                    request, address = self.socket.accept()
                except (BlockingIOError, InterruptedError):
                    break
                request.setblocking(True)
                self.process_request(request, address)
                taken += 1
        except OSError:  # the listener is gone already (a failed relisten): nothing waits on it
            pass
        return taken

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        log.debug("connection error from %s", client_address, exc_info=True)

    def relisten(self) -> None:
        """Listen again on the same address, on a fresh socket put under the same descriptor
        (dup2 closes the old one first, which frees the port), so the accept loop polling that
        descriptor goes on without a restart. For a listener left broken by its address going
        away; an OSError (the address is not back) leaves it for the next event."""
        try:  # wakes the accept loop's poll, which holds the old socket (and its port) while it waits
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        fresh = socket.socket(self.address_family, self.socket_type)
        try:
            os.dup2(fresh.fileno(), self.socket.fileno())
        finally:
            fresh.close()
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.server_bind()
                break
            except OSError as e:  # EADDRINUSE until that poll returns and lets the old socket go
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.server_activate()

    @property
    def bound_address(self) -> str:
        if self.address_family == socket.AF_UNIX:
            return f"unix:{self.server_address}"
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a killed process blocks bind(); remove it if nobody listens."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path}: another server is listening on this socket")
    finally:
        probe.close()


def metrics_router(app: App) -> Router:
    router = Router(prefix=None)
    router.add_service(app.config.server.metricspath, handle_metrics)
    router.add_service("/health", handle_health)
    return router


class Service:
    """The running process: main listener, optional metrics listener, watchdog, signals."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.app = App(config)
        self.conns = ConnectionTable(config.server.maxconnections, config.server.maxconnectionsperip,
                                     parse_networks(config.server.trustedproxies), self.app.metrics)
        self.access_log = AccessLog()
        self.server = HmacfsServer(config.listen, self.app, self.app.router, self.conns, self.access_log)
        self.metrics_server: Optional[HmacfsServer] = None
        # The metrics listener has its own small table: a flood of client connections must
        # not make the server unscrapeable, and scrapes are not client connections.
        self.metrics_conns = ConnectionTable(METRICS_CONNECTIONS)
        ml = config.metrics_listen
        if ml is not None and not self.app.metrics_on_main_port:
            self.metrics_server = HmacfsServer(ml, self.app, metrics_router(self.app), self.metrics_conns,
                                               self.access_log, role="metrics")
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.netwatch = AddressWatcher(self._address_changed, self.app.metrics) if config.server.networkevents else None

    def _address_changed(self, event: AddressEvent) -> None:
        """The address a listener is bound to came back: if that listener no longer takes
        connections (an IPv6 one may not), bind it again. Wildcard and Unix listeners, and
        sockets systemd passed us, never need it."""
        if event.kind != "added":
            return
        for s in (self.server, self.metrics_server):
            if (s is None or s.inherited is not None or s.listen.unix_path or not s.listen.host
                    or not same_address(event.address, s.listen.host)):
                continue
            if answers(s.listen.host, s.server_port):
                log.info("network event: the listener on %s still answers", s.bound_address)
                continue
            try:
                s.relisten()
                log.info("network event: listening again on %s", s.bound_address)
            except OSError as e:
                log.warning("network event: listening again on %s failed: %s", s.bound_address, e)

    def _watchdog(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            reaped = self.conns.reap(now) + self.metrics_conns.reap(now)
            if reaped:
                log.info("closed %d connection(s) past their read/write/idle deadline", reaped)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def request_reload(self, *_: object) -> None:
        self._reload.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; returns the exit code."""
        servers = [s for s in (self.server, self.metrics_server) if s is not None]
        threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.25},
                                    name=f"accept-{i}", daemon=True) for i, s in enumerate(servers)]
        threads.append(threading.Thread(target=self._watchdog, name="watchdog", daemon=True))
        self.access_log.start()
        self.app.start_background()
        if self.netwatch is not None:
            self.netwatch.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        for t in threads:
            t.start()
        cfg = self.config
        storage = (f"bucket {cfg.storage.s3bucket} at {cfg.storage.s3endpoint}" if self.app.objects is not None
                   else self.app.store.root)
        if self.app.redis is not None:
            storage += f", shared state in Redis {cfg.redis.redisaddr.rpartition('@')[2]}"  # never a URL's password
        log.info("hmacfs serving %s%s (storage %s, %d upload workers)%s", self.server.bound_address,
                 self.app.prefix, storage, self.app.gate.workers,
                 f"; metrics on {self.metrics_server.bound_address}" if self.metrics_server else "")
        systemd.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {self.server.bound_address}")
        while not self._stop.wait(0.2):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
        return self.drain(servers)

    def reload(self) -> None:
        systemd.notify_reloading()
        try:
            # First, and whatever the config says: logrotate has just moved the file (its postrotate HUP).
            if reopen_logs():
                log.info("log file reopened (SIGHUP)")
            try:
                new = config_mod.load(self.config.source)
            except Exception as e:  # a bad edit must not take the server down
                log.error("config reload failed, keeping the running config: %s", e)
                return
            set_level(new.server.loglevel)
            self.app.reload(new)
        finally:
            systemd.notify("READY=1")

    def drain(self, servers: list[HmacfsServer]) -> int:
        grace = self.config.timeouts.shutdown
        busy = self.conns.busy_count()
        log.info("shutting down: %d request(s) in flight, waiting up to %.0fs", busy, grace)
        systemd.notify("STOPPING=1")
        self.app.draining = True
        for s in servers:
            s.draining = True
        self.app.gate.close()
        for s in servers:
            s.shutdown()
            s.accept_pending()  # connections the kernel completed: closing the listener would reset them
            s.server_close()
        # An idle keep-alive connection may carry a request already on its way (a proxy took it
        # from its pool a moment ago; it cannot retry a POST that met a reset). Requests that
        # arrive in the grace are served with `Connection: close`; the connections still idle
        # after it are closed.
        idle_deadline = time.monotonic() + DRAIN_IDLE_GRACE
        while any(not c.in_request for c in self.conns.snapshot()) and time.monotonic() < idle_deadline:
            time.sleep(0.05)
        self.conns.close_idle()
        self.metrics_conns.close_all()
        deadline = time.monotonic() + grace
        while self.conns.busy_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.conns.busy_count()
        if left:
            log.warning("shutdown grace time over: closing %d unfinished request(s)", left)
        self.conns.close_all()
        for s in servers:
            if s.listen.unix_path and s.inherited is None:
                try:
                    os.unlink(s.listen.unix_path)
                except FileNotFoundError:
                    pass
        if self.netwatch is not None:
            self.netwatch.stop()
        self.app.stop_background()
        self.access_log.close()
        log.info("stopped")
        return 0
