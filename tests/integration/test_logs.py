"""The log file as an operator's tools see it: JSON a shipper parses line by line, size
rotation that keeps `logbackups` files, and logrotate's move-then-HUP with the shipped
contrib/logrotate/hmacfs, against the real process."""
from __future__ import annotations

import collections
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from hmacfs.services.logs import JsonFormatter, LogFile
from tests.conftest import need_program
from tests.support.client import put, request, url_path
from tests.support.hmacfs_proc import REPO

SHIPPED = REPO / "contrib" / "logrotate" / "hmacfs"
LOGFILE = "server.log"  # not hmacfs.log: HmacfsProcess keeps stdout/stderr there
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
ACCESS_FIELDS = {"time", "level", "logger", "msg", "client", "method", "path", "status", "bytes", "duration_ms"}


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def get_missing(srv, name: str) -> int:
    """One request that makes exactly one access line naming `name` (a 404 needs no signature)."""
    return request(srv.port, "GET", url_path(srv.prefix, name)).status


def test_every_json_line_parses_with_its_fields(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"loggingjson": True, "logfile": LOGFILE}})
    log_file = srv.workdir / LOGFILE
    name = f"{uuid.uuid4()}/j\u00e9.txt"
    assert put(srv, name, b"hello").status == 201
    assert request(srv.port, "GET", url_path(srv.prefix, name)).status == 200
    assert request(srv.port, "PUT", url_path(srv.prefix, name) + "?v=00", b"x").status == 403
    srv.proc.send_signal(signal.SIGHUP)  # a reopen and a reload log lines of their own
    wait_for(lambda: read(log_file).count('"status": 403') >= 2, "the access lines")
    # the main loop takes the SIGHUP at its next turn: a SIGTERM sent before that would win
    wait_for(lambda: "log file reopened (SIGHUP)" in read(log_file), "the reopen line")
    assert srv.stop() == 0
    lines = read(log_file).splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises
    assert len(records) >= 5
    for r in records:
        assert {"time", "level", "logger", "msg"} <= set(r), r
        assert TIME.match(r["time"]) and r["level"] in ("debug", "info", "warning", "error"), r
        assert r["logger"].startswith("hmacfs"), r
    access = [r for r in records if r["logger"] == "hmacfs.access" and r["path"] != "/health"]
    assert [(r["method"], r["status"]) for r in access][:3] == [("PUT", 201), ("GET", 200), ("PUT", 403)]
    for r in access:
        assert set(r) == ACCESS_FIELDS, r
        assert r["client"] == "127.0.0.1" and isinstance(r["bytes"], int) and r["duration_ms"] >= 0
        assert "v=" not in r["path"] and "?" not in r["path"]
    assert access[0]["path"].endswith("/j%C3%A9.txt") and access[1]["bytes"] == 5
    auth = [r for r in records if r["logger"] == "hmacfs.auth"]
    assert len(auth) == 1 and auth[0]["status"] == 403 and auth[0]["msg"].startswith("auth failure client=127.0.0.1")
    assert any(r["msg"] == "log file reopened (SIGHUP)" for r in records)
    assert any(r["msg"] == "stopped" for r in records)


def test_json_formatter_keeps_a_traceback_on_one_line() -> None:
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.getLogger("hmacfs.t").makeRecord("hmacfs.t", logging.ERROR, __file__, 1, "boom", (),
                                                          sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text and "ValueError: two\nlines" in json.loads(text)["exc"]


def test_size_rotation_keeps_n_backups(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"logfile": LOGFILE, "logmaxsize": "2KB", "logbackups": 2}})
    log_file = srv.workdir / LOGFILE
    names = [f"rot-{i:03d}.txt" for i in range(120)]  # ~85 bytes a line: several rotations
    for n in names:
        assert get_missing(srv, n) == 404
    wait_for(lambda: names[-1] in read(log_file), "the last access line")
    files = sorted(p.name for p in srv.workdir.glob(LOGFILE + "*"))
    assert files == [LOGFILE, LOGFILE + ".1", LOGFILE + ".2"], files
    for p in files:
        assert (srv.workdir / p).stat().st_size <= 2048
    # The kept files are the newest lines, each once, none lost between them. Their order is the
    # order requests ended in, not strictly the order they were sent: a request's access line is
    # handed to the writer after its response, so the next request (on a new connection) may get
    # there first; a swap of two neighbours is not a rotation fault.
    text = "".join(read(srv.workdir / p) for p in (LOGFILE + ".2", LOGFILE + ".1", LOGFILE))
    seen = [int(m) for m in re.findall(r"rot-(\d{3})\.txt", text)]
    assert sorted(seen) == list(range(min(seen), 120)) and min(seen) > 0
    assert all(abs(n - i) <= 2 for i, n in enumerate(seen, start=min(seen))), seen  # no file out of place


def test_logfile_reopen_follows_a_move(tmp_path: Path) -> None:
    handler = LogFile(str(tmp_path / "a.log"), maxBytes=0, backupCount=0, encoding="utf-8")
    logger = logging.Logger("reopen-test")
    logger.addHandler(handler)
    logger.warning("one")
    (tmp_path / "a.log").rename(tmp_path / "a.log.1")
    logger.warning("two")  # still the moved file: nothing is lost before the HUP
    assert handler.reopen()
    logger.warning("three")
    handler.close()
    assert read(tmp_path / "a.log.1") == "one\ntwo\n" and read(tmp_path / "a.log") == "three\n"


def test_logrotate_move_then_hup(hmacfs_factory, tmp_path: Path) -> None:
    logrotate = need_program("logrotate")
    srv = hmacfs_factory({"server": {"logfile": LOGFILE, "logmaxsize": 0, "loggingjson": True}})
    log_file = srv.workdir / LOGFILE
    pidfile = Path(srv.config["server"]["pidfilepath"])
    assert pidfile.read_text().strip() == str(srv.proc.pid)

    shipped = SHIPPED.read_text()
    directives = [line.split()[0] for line in shipped.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    assert "copytruncate" not in directives and "postrotate" in directives and "create" not in directives
    assert "/var/log/hmacfs/hmacfs.log" in shipped
    conf = tmp_path / "logrotate.conf"  # the shipped options, with this test's two paths
    conf.write_text(shipped.replace("/var/log/hmacfs/hmacfs.log", str(log_file))
                    .replace("/run/hmacfs/hmacfs.pid", str(pidfile)))
    conf.chmod(0o644)  # logrotate refuses a group- or world-writable config

    before = [f"before-{i:03d}" for i in range(20)]
    for n in before:
        assert get_missing(srv, n) == 404
    wait_for(lambda: before[-1] in read(log_file), "the lines before rotation")

    stop = threading.Event()
    during: list[str] = []

    def traffic() -> None:  # requests all through the rotation: none of their lines may go missing
        i = 0
        while not stop.is_set():
            name = f"during-{i:04d}"
            assert get_missing(srv, name) == 404
            during.append(name)
            i += 1

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.3)
        run = subprocess.run([logrotate, "-v", "-f", "-s", str(tmp_path / "state"), str(conf)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr + run.stdout
        assert "running postrotate script" in run.stderr + run.stdout
        wait_for(lambda: log_file.exists(), "the reopened log file")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    after = [f"after-{i:03d}" for i in range(20)]
    for n in after:
        assert get_missing(srv, n) == 404
    wait_for(lambda: after[-1] in read(log_file), "the lines after rotation")

    rotated = srv.workdir / (LOGFILE + ".1")  # delaycompress: the newest rotated file stays plain
    old, new = read(rotated), read(log_file)
    assert all(n in old for n in before) and not any(n in new for n in before)
    assert all(n in new for n in after) and not any(n in old for n in after)
    assert any(json.loads(line)["msg"] == "log file reopened (SIGHUP)" for line in new.splitlines())
    assert len(during) > 5
    records = [json.loads(line) for line in (old + new).splitlines()]  # no line torn in two by the switch
    paths = collections.Counter(r.get("path") for r in records)
    for n in during:  # each line exactly once, in one file or the other
        assert paths[url_path(srv.prefix, n)] == 1, n
    assert srv.proc.poll() is None and srv.stop() == 0
