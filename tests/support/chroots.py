"""Minimal Debian root filesystems (debootstrap) in which the zipapp is run on other Pythons.

Strategy: the zipapp promises to run on any host with a Python 3.9+ and nothing else. The
honest proof is a root filesystem holding only Debian's `python3` package, so each suite is
made once with `debootstrap --variant=minbase --include=python3` and cached OUTSIDE the
clone (a fresh checkout or `git clean` must not cost minutes again): built into a temporary
directory next to the cache entry and renamed into place, so an interrupted build never
leaves a half-made root that a later run would trust. A marker file written last is what
"present" means.

Run with `python3 -m tests.support.chroots bullseye trixie` to fill the cache ahead of a run.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

CACHE = Path(os.environ.get("HMACFS_CHROOT_CACHE", "/var/cache/hmacfs-tests/chroots"))
MARKER = ".hmacfs-chroot-ready"
# Tried in order: bullseye may move to the archive once its LTS ends.
MIRRORS = ("http://deb.debian.org/debian", "http://archive.debian.org/debian")


class Suite(NamedTuple):
    """A Debian release and the Python it ships (what the test proves)."""

    name: str
    python: str


SUITES = {"bullseye": Suite("bullseye", "3.9"), "trixie": Suite("trixie", "3.13")}


class ChrootUnavailable(Exception):
    """The root filesystem cannot be made here (no debootstrap, no root, no mirror); the reason says which."""


def _ready(root: Path) -> bool:
    return (root / MARKER).is_file() and (root / "usr" / "bin" / "python3").exists()


def _debootstrap(suite: str, target: Path, log: Path) -> Optional[str]:
    """Try each mirror in turn; None on success, else the tail of the last failure's log."""
    last = ""
    for mirror in MIRRORS:
        if target.exists():
            shutil.rmtree(target)
        with open(log, "wb") as out:
            r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", suite, str(target), mirror],
                               stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        if r.returncode == 0:
            return None
        last = f"{mirror}: " + log.read_text(errors="replace")[-800:]
    return last


def ensure(suite: str) -> Path:
    """The cached root filesystem for `suite`, made first if missing; ChrootUnavailable says why not."""
    root = CACHE / suite
    if _ready(root):
        return root
    if os.geteuid() != 0:
        raise ChrootUnavailable("debootstrap and chroot need root")
    if shutil.which("debootstrap") is None:
        raise ChrootUnavailable("debootstrap is not installed (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    # One builder at a time (pytest-xdist workers, parallel runs): the others wait, then reuse.
    with open(CACHE / f".{suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(root):
            return root
        work = Path(tempfile.mkdtemp(prefix=f".{suite}.", dir=CACHE))
        try:
            started = time.monotonic()
            failure = _debootstrap(suite, work / "root", work / "debootstrap.log")
            if failure is not None:
                raise ChrootUnavailable(f"debootstrap {suite} failed on every mirror; last: {failure}")
            (work / "root" / MARKER).write_text(f"built in {time.monotonic() - started:.0f} s\n")
            if root.exists():  # a stale root without its marker: an older, interrupted layout
                shutil.rmtree(root)
            os.replace(work / "root", root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def command(root: Path, argv: list[str], *, netns: bool = False, resolv_conf: Optional[Path] = None) -> list[str]:
    """The host command line that runs argv inside `root`, as on a bare host with only Python.

    A private mount namespace (`unshare -m`) shows the host's /proc inside the root (Python and
    hmacfs read /proc/self; a real host has it) and, with `resolv_conf`, puts that file over the
    root's /etc/resolv.conf, all without touching the shared cached root and gone when the process
    ends. With `netns`, `unshare -n` gives a fresh network namespace holding only `lo`, brought up
    with the host's `ip` (a minbase root has none) before entering the root. Every step execs, so
    the Popen pid is the Python process itself: signals reach it and its exit status comes back.
    """
    env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"]
    steps = [f"mount --bind /proc {shlex.quote(str(root / 'proc'))}"]
    if resolv_conf is not None:
        steps.append(f"mount --bind {shlex.quote(str(resolv_conf))} {shlex.quote(str(root / 'etc/resolv.conf'))}")
    if netns:
        steps.append("ip link set lo up")
    script = " && ".join([*steps, 'exec "$@"'])
    return ["unshare", "-m", *(["-n"] if netns else []), "sh", "-c", script, "sh",
            "chroot", str(root), *env, *argv]


def run(root: Path, argv: list[str], *, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run argv inside `root` to completion (see `command`), capturing text output."""
    netns = kwargs.pop("netns", False)
    resolv_conf = kwargs.pop("resolv_conf", None)
    return subprocess.run(command(root, argv, netns=netns, resolv_conf=resolv_conf), timeout=timeout,
                          capture_output=True, text=True, **kwargs)


def main(argv: list[str]) -> int:
    """Fill the cache ahead of a test run (CI warm-up)."""
    for suite in argv or list(SUITES):
        started = time.monotonic()
        print(f"{suite}: {ensure(suite)} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
