"""Logging set-up: level, stderr or a rotated file, plain text or one JSON object per line.

The access log (logger `hmacfs.access`) carries method, path without the query string
(it holds signatures), status, bytes, duration and client address. Nothing logs a secret
or a MAC: requests are logged from their path only, and config output masks secrets.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from typing import Optional

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}
_FIELDS = ("client", "method", "path", "status", "bytes", "duration_ms")


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


def setup_logging(level: str = "info", logfile: str = "", as_json: bool = False,
                  max_bytes: int = 100 * 1024 * 1024, backups: int = 5,
                  stream: Optional[object] = None) -> None:
    """Configure the `hmacfs` logger tree once per process."""
    root = logging.getLogger("hmacfs")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if logfile:
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            logfile, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("hmacfs").setLevel(LEVELS.get(level.lower(), logging.INFO))
