"""One writer per resumable upload across every node of a cluster (Redis), with takeover.

Strategy: `Writers` (resumable.py) gives one request at a time per upload inside a
process, and a newcomer cuts a stale holder's connection. Across nodes the turn is a
Redis lock per upload (SET NX PX with a random token), renewed by its holder's node every
RENEW_EVERY seconds and lapsing LOCK_TTL seconds after a node dies, so a phone whose
upload was going through a node that crashed resumes on another within seconds. A
newcomer on another node that finds the lock held raises a takeover flag; the holder's
node checks the flags of its uploads at every renewal and cuts a holder that is stale
(reading a body that stopped arriving), exactly as a newcomer on the same node would.
A holder whose lock could not be renewed is marked `lost`: its append is not completed
(storage/objectpartials.py), so two nodes never both add bytes at one offset.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .errors import HTTPError
from .resumable import STALE_AFTER, TAKEOVER_POLL, TAKEOVER_WAIT, Attachment, UploadBusy, Writers
from .services.redisconn import RELEASE_SCRIPT, RENEW_SCRIPT

log = logging.getLogger("hmacfs")
LOCK_TTL = 6.0      # seconds a lock outlives its holder's last renewal (a dead node's uploads wait this long)
RENEW_EVERY = 1.0


def _redis_down(e: Exception) -> HTTPError:
    log.error("resumable upload lock: Redis unavailable (%s)", e)
    return HTTPError(503, "shared state (Redis) is unavailable, retry later", {"Retry-After": "5"})


class ClusterWriters(Writers):
    """Writers whose turn is also a Redis lock shared by every node."""

    def __init__(self, client: Any, prefix: str, wait: float = TAKEOVER_WAIT,
                 on_takeover: Optional[Callable[[], None]] = None, ttl: float = LOCK_TTL) -> None:
        super().__init__(wait, on_takeover)
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl * 1000)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._held: dict[str, tuple[str, Attachment]] = {}  # upload id -> (token, attachment)
        self._held_lock = threading.Lock()
        self._ticker: Optional[threading.Thread] = None

    def _lock_key(self, upload_id: str) -> str:
        return f"{self.prefix}upload-lock:{upload_id}"

    def _flag_key(self, upload_id: str) -> str:
        return f"{self.prefix}upload-takeover:{upload_id}"

    @contextmanager
    def hold(self, upload_id: str, sock: Optional[socket.socket]) -> Iterator[Attachment]:
        with super().hold(upload_id, sock) as entry:  # this node's turn first
            token = secrets.token_hex(16)
            self._acquire(upload_id, token)
            entry.lost = False
            with self._held_lock:
                self._held[upload_id] = (token, entry)
                self._start_ticker()
            try:
                yield entry
            finally:
                with self._held_lock:
                    self._held.pop(upload_id, None)
                try:
                    self._release(keys=[self._lock_key(upload_id)], args=[token])
                except Exception as e:  # it lapses by itself
                    log.warning("resumable upload lock: not released (%s); it lapses in %.0fs", e,
                                self.ttl_ms / 1000)

    def busy(self, upload_id: str) -> bool:
        if super().busy(upload_id):
            return True
        try:
            return bool(self.client.exists(self._lock_key(upload_id)))
        except Exception as e:
            raise _redis_down(e) from None

    def _acquire(self, upload_id: str, token: str) -> None:
        """Take the upload's lock, asking another node's stale holder to let go; 423 after `wait`."""
        deadline = time.monotonic() + self.wait
        key = self._lock_key(upload_id)
        asked = False
        while True:
            try:
                if self.client.set(key, token, nx=True, px=self.ttl_ms):
                    if asked:
                        self.client.delete(self._flag_key(upload_id))
                    return
                if not asked:
                    self.client.set(self._flag_key(upload_id), "1", px=self.ttl_ms * 2)
                    asked = True
            except Exception as e:
                raise _redis_down(e) from None
            if time.monotonic() >= deadline:
                raise UploadBusy()
            time.sleep(TAKEOVER_POLL)

    def _start_ticker(self) -> None:
        if self._ticker is None or not self._ticker.is_alive():
            self._ticker = threading.Thread(target=self._tick_forever, name="upload-locks", daemon=True)
            self._ticker.start()

    def _tick_forever(self) -> None:
        while True:
            time.sleep(RENEW_EVERY)
            with self._held_lock:
                held = list(self._held.items())
            if not held:
                with self._held_lock:
                    if not self._held:
                        self._ticker = None
                        return
                continue
            for upload_id, (token, entry) in held:
                self._tick(upload_id, token, entry)

    def _tick(self, upload_id: str, token: str, entry: Attachment) -> None:
        """Renew one lock; on a takeover request, cut the holder if it is stale."""
        try:
            renewed = self._renew(keys=[self._lock_key(upload_id)], args=[token, self.ttl_ms])
            asked = self.client.exists(self._flag_key(upload_id))
        except Exception as e:
            log.warning("resumable upload lock: not renewed (%s)", e)
            renewed, asked = 0, 0
        if not renewed:
            if not entry.lost:
                log.warning("upload %s…: the shared lock lapsed; this node's append will not be kept", upload_id[:8])
            entry.lost = True
            _cut(entry)
            return
        if asked and entry.reading and time.monotonic() - entry.progress >= STALE_AFTER:
            log.info("upload %s…: a request on another node takes over from the one attached here", upload_id[:8])
            if self.on_takeover is not None:
                self.on_takeover()
            _cut(entry)


def _cut(entry: Attachment) -> None:
    holder = entry.sock
    if holder is not None:
        try:
            holder.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
