"""Logging set-up: level, stderr or a rotated file, plain text or one JSON object per line.

The access log (logger `hmacfs.access`) carries method, path without the query string
(it holds signatures), status, bytes, duration and client address. Nothing logs a secret
or a MAC: requests are logged from their path only, and config output masks secrets.

The auth log (logger `hmacfs.auth`, level WARNING) has one line per failed signature check,
in a format that fail2ban's filter (contrib/fail2ban/filter.d/hmacfs.conf) matches and that
therefore must not change:

    auth failure client=<address> status=<3 digits> method=<method> reason="<text>" path=<path>

The client address comes first, right after fixed text, so nothing a client sends (the
path, last) can stand where the filter looks for the address. Bans are logged there too, as
`ban client=... until=...`, which the filter does not match. fail2ban strips the timestamp and
takes a line without one as a line all the same, so no line may start with text a client
chose: plain-text records that span lines (tracebacks) have every line after the first
marked with `  | ` (`LineFormatter`), and JSON records are one line by construction.
"""
from __future__ import annotations

import collections
import json
import logging
import logging.handlers
import sys
import threading
import time
from typing import Optional

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}
_FIELDS = ("client", "method", "path", "status", "bytes", "duration_ms")
auth_log = logging.getLogger("hmacfs.auth")


CONTINUATION = "\n  | "


class LineFormatter(logging.Formatter):
    """The plain-text format, one log line per record start: any line after a record's first
    (a traceback, an exception message with a line break in it) begins with `  | `, so it can
    never pass for a record of its own, to a reader or to fail2ban."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.isprintable():
            return text
        lines = text.splitlines()
        return CONTINUATION.join(lines) if len(lines) > 1 else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the access-log fields as keys when present."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for field in _FIELDS:
            if hasattr(record, field):
                doc[field] = getattr(record, field)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class LogFile(logging.handlers.RotatingFileHandler):
    """The log file: rotated by size here (`logmaxsize`, `logbackups`; 0 turns it off), and
    reopened by name on SIGHUP (`reopen`), for logrotate's move-then-HUP.

    Size rotation renames `hmacfs.log` to `.1`, `.2`, ... in the writing process, so no line is
    lost between files. An external rotator instead renames the file while we hold it open;
    until the HUP our lines go on into the renamed file (nothing lost), after it into a new
    file at the configured path. Copy-and-truncate is not needed and loses lines, so the
    shipped contrib/logrotate/hmacfs does not use it.
    """

    def reopen(self) -> bool:
        """Open the configured path afresh and switch to it under the handler lock (the access
        log writer thread emits through the same lock, so no record is half in each file).
        If the new file cannot be opened, keep writing to the old one."""
        self.acquire()
        try:
            try:
                fresh = self._open()
            except OSError as e:
                sys.stderr.write(f"hmacfs: cannot reopen log file {self.baseFilename}: {e}\n")
                return False
            old, self.stream = self.stream, fresh
            if old is not None:
                try:
                    old.flush()
                    old.close()
                except OSError:
                    pass
            return True
        finally:
            self.release()


def reopen_logs() -> int:
    """Reopen every log file of the `hmacfs` logger (on SIGHUP); returns how many."""
    return sum(1 for h in logging.getLogger("hmacfs").handlers if isinstance(h, LogFile) and h.reopen())


def setup_logging(level: str = "info", logfile: str = "", as_json: bool = False,
                  max_bytes: int = 100 * 1024 * 1024, backups: int = 5,
                  stream: Optional[object] = None) -> None:
    """Configure the `hmacfs` logger tree once per process."""
    root = logging.getLogger("hmacfs")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if logfile:
        handler: logging.Handler = LogFile(logfile, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(LineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("hmacfs").setLevel(LEVELS.get(level.lower(), logging.INFO))


def _escape(c: str) -> str:
    o = ord(c)
    if c == "\\":
        return "\\\\"
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte itself
        return f"\\x{o - 0xDC00:02x}"
    if c.isprintable():
        return c
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def printable(text: str) -> str:
    """Attacker-supplied text made safe for a log line: every character that is not printable
    (C0 and C1 controls, DEL, U+2028/U+2029 and other separators, format characters such as
    bidi overrides, undecodable bytes) is escaped, and so is the backslash, so an escape in the
    log is never ambiguous and no reader splitting lines sees a forged entry."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def printable_path(raw: bytes) -> str:
    """A raw request path for the log: UTF-8 shown as text, anything else as escaped bytes."""
    return printable(raw.decode("utf-8", "surrogateescape"))


def auth_failure_message(client: str, status: int, method: str, raw_path: bytes, reason: str) -> str:
    """The fail2ban line (see the module docstring); `raw_path` without its query (signatures)."""
    quoted = printable(reason).replace('"', '\\"')
    return (f"auth failure client={printable(client)} status={int(status):03d} method={printable(method)} "
            f'reason="{quoted}" path={printable_path(raw_path)}')


def log_auth_failure(client: str, status: int, method: str, raw_path: bytes, reason: str) -> None:
    """One WARNING line on `hmacfs.auth` for a failed signature check. JSON logs also get `client`
    and `status` as fields (not `method` and `path`: a reader that takes records with those for
    access lines must not count a request twice)."""
    if auth_log.isEnabledFor(logging.WARNING):
        auth_log.warning("%s", auth_failure_message(client, status, method, raw_path, reason),
                         extra={"client": client, "status": status})


class AccessLog:
    """Access lines handed off to one writer thread, emitted in batches.

    A request thread only appends a tuple (well under a microsecond); building the
    LogRecord, formatting and the write happen in the writer, so logging every request
    does not stall the request threads on the logging lock and a write per line. Lines
    reach the log within `interval`; `flush()` at shutdown writes what is pending.
    """

    def __init__(self, logger: Optional[logging.Logger] = None, interval: float = 0.2) -> None:
        self.logger = logger or logging.getLogger("hmacfs.access")
        self.interval = interval
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def record(self, client: str, method: str, raw_path: bytes, status: int, nbytes: int, seconds: float) -> None:
        """Queue one access line; `raw_path` is the request path without its query (never log signatures)."""
        if self.logger.isEnabledFor(logging.INFO):
            self._pending.append((time.time(), client, method, raw_path, status, nbytes, seconds))
            if self._thread is None:
                self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            while self._pending:
                ts, client, method, raw_path, status, nbytes, seconds = self._pending.popleft()
                ms = round(seconds * 1000.0, 3)
                method, path = printable(method), printable_path(raw_path)
                record = self.logger.makeRecord(
                    self.logger.name, logging.INFO, __file__, 0, '%s "%s %s" %d %d %.1fms',
                    (client, method, path, status, nbytes, ms), None,
                    extra={"client": client, "method": method, "path": path, "status": status,
                           "bytes": nbytes, "duration_ms": ms})
                record.created, record.msecs = ts, (ts % 1) * 1000
                self.logger.handle(record)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
