"""Thumbnails of stored images, made by ImageMagick in a fenced-off subprocess.

Strategy: an image is attacker-supplied input to a large C library, so it never meets
ImageMagick inside the server process and never on the request path. After a commit the
pipeline hands the record to `submit` (cheap: a type check and a bounded queue; a full
queue drops the job, the periodic scan catches up). One worker thread then:
- opens the bytes through the catalog (a plain file, a dedup blob, or AES-GCM segments
  decrypted into a private temp file under `.hmacfs/tmp`), and decides the format by its
  magic bytes alone: PNG, JPEG, GIF or WebP, never SVG or anything else. The coder is named
  explicitly on the command line (`png:`), so ImageMagick never sniffs a script format;
- runs `magick`/`convert` with `-limit` on memory, map, disk, area, width, height and
  time, a generated policy.xml (`MAGICK_CONFIGURE_PATH`) that allows only those four
  coders and no delegates, CPU and address-space rlimits, and a wall-clock timeout after
  which its process group is killed. A decompression bomb (a PNG declaring 50000x50000
  pixels in a few KB) fails at the width/height limit before a pixel is allocated;
- writes the result to a temp name and renames it into place (encrypted, with the same
  keyring, when [encryption] is on), named by the sha256 of the signed path.
A periodic scan makes what is missing and removes thumbnails whose file is gone; removals
go through `Catalog.remove`'s hook. Failures are logged and counted, never raised.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from ..meta import FileRecord
from ..pipeline import ENCRYPTED_MAGIC
from ..storage.local import unlink_if_present

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..meta import MetaStore
    from ..storage.local import LocalStore

log = logging.getLogger("hmacfs")

QUEUE_SIZE = 256
TIMEOUT = 30.0            # wall clock for one thumbnail, seconds
CPU_SECONDS = 20          # RLIMIT_CPU of the subprocess
ADDRESS_SPACE = 1 << 30   # RLIMIT_AS of the subprocess (ImageMagick maps its libraries too)
OUTPUT_LIMIT = 16 << 20   # RLIMIT_FSIZE: no thumbnail (or pixel cache file) is bigger
MAX_SIDE = 16384          # widest/tallest image ImageMagick may even start to decode
SCAN_BATCH = 500
# Magic bytes -> (ImageMagick coder, thumbnail format). JPEG stays JPEG (photos); the rest
# become PNG, which keeps transparency.
FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "png", "png"),
    (b"\xff\xd8\xff", "jpeg", "jpeg"),
    (b"GIF87a", "gif", "png"),
    (b"GIF89a", "gif", "png"),
)
THUMB_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/gif", "image/webp"})
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".gif", ".webp")
# Content types whose bytes may still be an image (a client that does not say what it sends).
UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})

POLICY = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by hmacfs for its thumbnailer: four coders, no delegates, small resources. -->
<policymap>
  <policy domain="resource" name="memory" value="256MiB"/>
  <policy domain="resource" name="map" value="512MiB"/>
  <policy domain="resource" name="disk" value="1GiB"/>
  <policy domain="resource" name="area" value="128MP"/>
  <policy domain="resource" name="width" value="{MAX_SIDE}"/>
  <policy domain="resource" name="height" value="{MAX_SIDE}"/>
  <policy domain="resource" name="time" value="{int(TIMEOUT)}"/>
  <policy domain="resource" name="thread" value="1"/>
  <policy domain="delegate" rights="none" pattern="*"/>
  <policy domain="filter" rights="none" pattern="*"/>
  <policy domain="path" rights="none" pattern="@*"/>
  <policy domain="coder" rights="none" pattern="*"/>
  <policy domain="coder" rights="read|write" pattern="{{PNG,JPEG,GIF,WEBP}}"/>
</policymap>
"""


class Thumb(NamedTuple):
    """An opened thumbnail: its fd (the caller closes it), stat, and what it holds."""

    fd: int
    st: os.stat_result
    content_type: str
    encrypted: bool


def parse_size(text: str) -> tuple[int, int]:
    """`"200x200"` -> (200, 200); ValueError for anything else (each side 1..4096)."""
    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or not (0 < int(w) <= 4096 and 0 < int(h) <= 4096):
        raise ValueError(f"{text!r}: expected WIDTHxHEIGHT, each 1 to 4096 (e.g. \"200x200\")")
    return int(w), int(h)


def sniff(head: bytes) -> Optional[tuple[str, str]]:
    """(coder, thumbnail format) for the magic bytes of a supported image, else None."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "png"
    for magic, coder, out in FORMATS:
        if head.startswith(magic):
            return coder, out
    return None


def may_be_image(record: FileRecord) -> bool:
    """Worth a look at the magic bytes? Never for SVG or other declared non-image types."""
    ctype = record.content_type.split(";", 1)[0].strip().lower()
    if ctype in IMAGE_TYPES:
        return True
    return ctype in UNTYPED and record.path.lower().endswith(IMAGE_EXTENSIONS)


def find_program() -> Optional[list[str]]:
    """ImageMagick 7's `magick`, else 6's `convert` (Debian 12), from PATH."""
    magick = shutil.which("magick")
    if magick:
        return [magick]
    convert = shutil.which("convert")
    return [convert] if convert else None


def _limit_child() -> None:
    """preexec_fn: only setrlimit calls (nothing that allocates or takes a lock after fork)."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Thumbnailer:
    """The queue, the worker, the periodic scan and the thumbnail files of one store."""

    def __init__(self, store: LocalStore, meta: MetaStore, catalog: Catalog, directory: str,
                 size: tuple[int, int], interval: float, keyring: Callable[[], object],
                 metrics=None) -> None:
        self.store = store
        self.meta = meta
        self.catalog = catalog
        self.directory = os.path.realpath(directory)
        self.size = size
        self.interval = interval
        self.keyring = keyring  # the current keyring (SIGHUP may rotate it), or None
        self.metrics = metrics
        self.program = find_program()
        self.policy_dir = os.path.join(store.internal, "magick")
        # ImageMagick's output and pixel-cache files; not in the store's tmp/, whose sweeps
        # expect only files there
        self.work_dir = os.path.join(self.policy_dir, "work")
        self._queue: queue.Queue[Optional[str]] = queue.Queue(QUEUE_SIZE)
        self._queued: set[str] = set()
        self._failed: dict[str, str] = {}  # path -> sha256 that failed: the scan does not retry it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if self.program is None:
            log.warning("[thumbnails] enabled, but neither magick nor convert (ImageMagick) is on PATH: "
                        "no thumbnails will be made")

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """The directories, the policy file, then the worker and the scan. Without them the
        server still serves: thumbnails are an extra, so a failure here is logged, not fatal."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.makedirs(self.policy_dir, mode=0o700, exist_ok=True)
            os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
            with open(os.path.join(self.policy_dir, "policy.xml"), "w") as f:
                f.write(POLICY)
            for entry in os.scandir(self.work_dir):  # a crash's leftovers (one conversion runs at a time)
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
        except OSError as e:
            log.error("[thumbnails] cannot prepare %s: %s; no thumbnails will be made", self.directory, e)
            self.program = None
            return
        for target, name in ((self._work, "thumbnailer"), (self._scan_loop, "thumbnail-scan")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    # -- naming and serving ---------------------------------------------------------------------

    def _base(self, signed_path: str) -> str:
        key = hashlib.sha256(signed_path.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.directory, key[:2], key)

    def open(self, signed_path: str) -> Optional[Thumb]:
        """The thumbnail of `signed_path` opened for reading, or None when there is none (yet)."""
        base = self._base(signed_path)
        for fmt, ctype in THUMB_TYPES.items():
            try:
                fd = os.open(f"{base}.{fmt}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            head = os.pread(fd, 8, 0)
            return Thumb(fd, os.fstat(fd), ctype, head == ENCRYPTED_MAGIC)
        return None

    def remove(self, signed_path: str) -> None:
        """Catalog.remove's hook: the thumbnail goes with its file."""
        try:
            self._remove_formats(self._base(signed_path))
        except OSError as e:
            log.warning("could not remove the thumbnail of %r: %s", signed_path, e)

    @staticmethod
    def _remove_formats(base: str, keep: Optional[str] = None) -> None:
        """Every format's thumbnail file of one path, but `keep`'s."""
        for fmt in THUMB_TYPES:
            if fmt != keep:
                unlink_if_present(f"{base}.{fmt}")

    def has(self, signed_path: str) -> bool:
        base = self._base(signed_path)
        return any(os.path.exists(f"{base}.{fmt}") for fmt in THUMB_TYPES)

    # -- the queue ------------------------------------------------------------------------------

    def submit(self, record: FileRecord) -> None:
        """The pipeline's on_commit hook: queue an image; for anything else drop a stale thumbnail
        (a versioned path that now holds a text file). Never blocks, never raises."""
        try:
            if not may_be_image(record):
                self.remove(record.path)
                return
            self._enqueue(record.path)
        except Exception:
            log.exception("thumbnail: could not queue %r", record.path)

    def _enqueue(self, path: str) -> bool:
        if self.program is None:
            return False
        with self._lock:
            if path in self._queued:
                return True
            try:
                self._queue.put_nowait(path)
            except queue.Full:
                log.debug("thumbnail queue full: %r is left to the next scan", path)
                return False
            self._queued.add(path)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            path = self._queue.get()
            if path is None:
                return
            with self._lock:
                self._queued.discard(path)
            try:
                self.make(path)
            except Exception:
                log.exception("thumbnail of %r failed unexpectedly", path)
                self._count("failed")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.thumbnails.inc(1, result)

    # -- making one -----------------------------------------------------------------------------

    def make(self, path: str) -> Optional[bool]:
        """Make the thumbnail of `path`: True made, False failed, None not an image (or gone)."""
        record = self.meta.get(path)
        if record is None or not may_be_image(record):
            return None
        opened = self.catalog.open_current(path, record)
        if opened is None:
            return None
        fd, st = opened
        plain_temp = None
        try:
            if record.encrypted:
                plain_temp = self._decrypt(fd, st)
                os.close(fd)
                fd = os.open(plain_temp, os.O_RDONLY | os.O_CLOEXEC)
            kind = sniff(os.pread(fd, 16, 0))
            if kind is None:
                return None
            ok = self._convert(path, fd, kind[0], kind[1])
        finally:
            os.close(fd)
            if plain_temp is not None:
                self.store.discard_temp(plain_temp)
        if ok:
            current = self.meta.get(path)
            if current is None or current.sha256 != record.sha256:  # removed or replaced meanwhile
                self.remove(path)
                if current is not None:
                    self._enqueue(path)
                return None
        with self._lock:
            if ok:
                self._failed.pop(path, None)
            elif len(self._failed) < 100000:  # bounded; past it, failures are retried by each scan
                self._failed[path] = record.sha256
        self._count("made" if ok else "failed")
        return ok

    def _decrypt(self, fd: int, st: os.stat_result) -> str:
        """The plaintext of an encrypted file in a private temp file (swept at start-up if left)."""
        from ..storage.encrypted import SegmentReader

        reader = SegmentReader(fd, self.keyring(), st.st_size)  # type: ignore[arg-type]
        f, temp = self.store.new_temp()
        try:
            with f:
                if reader.plaintext_size:
                    for piece in reader.iter_range(0, reader.plaintext_size - 1):
                        f.write(piece)
        except BaseException:
            self.store.discard_temp(temp)
            raise
        return temp

    def _convert(self, path: str, fd: int, coder: str, out_format: str) -> bool:
        """Run ImageMagick on the image open at `fd` (its stdin); place the result on success."""
        assert self.program is not None
        w, h = self.size
        out = os.path.join(self.work_dir, f"out-{os.urandom(8).hex()}.{out_format}")
        frame = "[0]" if coder in ("gif", "webp") else ""
        limits = ["-limit", "memory", "256MiB", "-limit", "map", "512MiB", "-limit", "disk", "1GiB",
                  "-limit", "area", "128MP", "-limit", "width", str(MAX_SIDE), "-limit", "height", str(MAX_SIDE),
                  "-limit", "time", str(int(TIMEOUT)), "-limit", "thread", "1"]
        command = [*self.program, *limits, f"{coder}:/dev/stdin{frame}", "-auto-orient",
                   "-thumbnail", f"{w}x{h}>", "-strip", f"{out_format}:{out}"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MAGICK_CONFIGURE_PATH": self.policy_dir,
               "MAGICK_TMPDIR": self.work_dir, "TMPDIR": self.work_dir, "OMP_NUM_THREADS": "1",
               "MAGICK_THREAD_LIMIT": "1", "LC_ALL": "C"}
        os.lseek(fd, 0, os.SEEK_SET)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=fd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env, cwd=self.work_dir, close_fds=True, start_new_session=True,
                                    preexec_fn=_limit_child)  # setrlimit only: safe after fork
            try:
                _, err = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                log.warning("thumbnail of %r: ImageMagick took longer than %.0fs and was killed", path, TIMEOUT)
                return False
            if proc.returncode != 0 or not os.path.isfile(out) or os.path.getsize(out) == 0:
                lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
                # "no images defined" alone: the reader gave up silently (a width/height limit)
                reason = "; ".join(lines)[:400] if lines else "no output"
                log.warning("thumbnail of %r failed (exit %s after %.1fs; a broken image, or one past the "
                            "limits): %s", path, proc.returncode, time.monotonic() - started, reason)
                return False
            self._place(path, out, out_format)
            log.debug("thumbnail of %r made in %.2fs", path, time.monotonic() - started)
            return True
        finally:
            unlink_if_present(out)

    def _place(self, path: str, made: str, out_format: str) -> None:
        """Rename the thumbnail into place (after encrypting it, with encryption on); the other
        format's file, from an earlier version of the path, goes."""
        base = self._base(path)
        os.makedirs(os.path.dirname(base), mode=0o700, exist_ok=True)
        final = f"{base}.{out_format}"
        temp = f"{base}.tmp-{os.urandom(6).hex()}"
        keyring = self.keyring()
        try:
            with open(made, "rb") as src, open(temp, "wb") as dst:
                data = src.read(OUTPUT_LIMIT + 1)
                if len(data) > OUTPUT_LIMIT:
                    raise OSError("thumbnail larger than its limit")
                if keyring is not None:
                    from ..storage.encrypted import SegmentWriter

                    writer = SegmentWriter(dst, keyring)  # type: ignore[arg-type]
                    writer.write(data)
                    writer.finish()
                else:
                    dst.write(data)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(temp, final)
        except BaseException:
            unlink_if_present(temp)
            raise
        self._remove_formats(base, keep=out_format)

    # -- the periodic scan ----------------------------------------------------------------------

    def _scan_loop(self) -> None:
        self._stop.wait(1.0)  # let the server start listening first
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("thumbnail scan failed (retried at the next interval)")
            self._stop.wait(self.interval)

    def scan(self) -> tuple[int, int]:
        """Queue every image without a thumbnail and remove thumbnails whose file is gone;
        (queued, removed). An image that failed is not tried again until it changes or the server
        restarts."""
        queued = 0
        wanted: set[str] = set()
        after = ""
        while not self._stop.is_set():
            rows = self.meta.select(limit=SCAN_BATCH, after=after)  # type: ignore[attr-defined]
            if not rows:
                break
            after = rows[-1].path
            for record in rows:
                if not may_be_image(record):
                    continue
                wanted.add(os.path.basename(self._base(record.path)))
                if self._failed.get(record.path) == record.sha256:
                    continue  # failed already (a broken or hostile image): once per content and run
                if not self.has(record.path) and self._enqueue(record.path):
                    queued += 1
            time.sleep(0.01)
        removed = 0 if self._stop.is_set() else self._remove_orphans(wanted)
        if queued or removed:
            log.info("thumbnail scan: %d image(s) queued, %d orphaned thumbnail(s) removed", queued, removed)
        return queued, removed

    def _remove_orphans(self, wanted: set[str]) -> int:
        removed = 0
        now = time.time()
        for sub in os.scandir(self.directory):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                stem = entry.name.split(".", 1)[0]
                if stem in wanted:
                    continue
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime < 60:
                        continue  # just made for a commit whose row the scan read before it existed
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
