"""ISO containers: pack stored files into ISO 9660 images, list them, verify them.

Why: an operator keeps years of uploads; old files are read rarely, and a few large
write-once images are easier to archive, copy and checksum than a million small files.
Packed files stay downloadable at their old URLs: the row records the image and the
byte offset of the file's extent, and downloads read that slice of the image directly
(storage/iso9660.py, catalog.open_packed), with no mount and no root.

Strategy, one image at a time:
1. select rows (by age and prefix) whose file is plain, private to its path and unchanged
   on disk; skip the rest with a reason (deduplicated, encrypted, expiring, too large);
2. hard-link the files into a staging tree under `.hmacfs/` (same names as their paths;
   no bytes are copied) and run `genisoimage` (or `xorriso -as mkisofs`) with Rock Ridge, so names in
   `iso.charset` survive whole; write to a temp name, fsync, rename;
3. read the image back with our own reader: every file's extent must hash to the row's
   sha256 before anything changes;
4. per file, in one metadata transaction: the row is re-read and must still describe the
   same file, then gains `image`/`image_offset`; after the commit the file at the path is
   moved out of the served tree and unlinked. A crash between the two leaves both copies:
   the row already serves the image's bytes, and the next `iso pack` removes the leftover.
   (A crash while building leaves `.hmacfs/iso-staging-*`, hard links only, and a
   `.*.iso.tmp` under the mountpoint: safe to delete.)

Encryption: packing is refused while [encryption] is on (and encrypted files are always
skipped): an image of ciphertext would need the segment reader at a base offset, and an
image of plaintext would undo the encryption; neither is worth it for an archive tier yet.
A packed file that is then deleted (DELETE, expiry, `files delete`) loses its row, so it
is a 404 at once; its bytes stay in the image, which is written once and never rewritten.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Optional

from .meta import FileRecord
from .pipeline import record_matches
from .storage.iso9660 import IsoEntry, IsoError, read_entries
from .storage.local import fsync_dir

if TYPE_CHECKING:
    from .manage import Tools

SECTOR = 2048
IMAGE_OVERHEAD = 192 * 1024     # system area, descriptors, path tables, root: generous
PER_FILE_OVERHEAD = 2 * SECTOR  # a directory record with Rock Ridge entries, and its directory
MAX_FILE = 4 * 1024 ** 3 - SECTOR  # one extent (no multi-extent files: the reader refuses them)
PAGE = 1000
TOOL_TIMEOUT = 6 * 3600


class IsoPackError(RuntimeError):
    """Packing cannot go on (no tool, the tool failed, the image does not read back)."""


@dataclass
class PackReport:
    images: list[dict] = field(default_factory=list)  # {"image", "size", "files", "bytes"}
    packed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    tidied: int = 0  # leftover files of an interrupted pack removed

    def as_dict(self) -> dict:
        return {"images": self.images, "packed": len(self.packed), "tidied": self.tidied,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def iso_directory(tools: Tools) -> str:
    """Where images are kept: `iso.mountpoint`, default `<storagepath>/.hmacfs/iso` (never served)."""
    return os.path.abspath(tools.config.iso.mountpoint or os.path.join(tools.store.internal, "iso"))


def mkisofs_command() -> list[str]:
    """genisoimage, else xorriso in its mkisofs emulation (same options)."""
    for name, prefix in (("genisoimage", []), ("xorriso", ["-as", "mkisofs"])):
        found = shutil.which(name)
        if found:
            return [found, *prefix]
    raise IsoPackError("neither genisoimage nor xorriso is installed (apt install genisoimage)")


def pack(tools: Tools, older_than: Optional[float] = None, prefix: Optional[str] = None,
         dry_run: bool = False) -> PackReport:
    """Pack the selected files into images of at most `iso.size` bytes; see the module docstring."""
    from .manage import UsageError

    config = tools.config
    if not config.iso.enabled:
        raise UsageError("ISO containers are off: set [iso] enabled = true")
    if config.encryption.enabled:
        raise UsageError("refusing to pack while [encryption] is on: packed images would hold plaintext "
                         "(see README, ISO containers)")
    try:
        "".encode(config.iso.charset)
    except LookupError:
        raise UsageError(f"[iso] charset {config.iso.charset!r} is not a known character set") from None
    report = PackReport()
    directory = iso_directory(tools)
    if not dry_run:
        report.tidied = _tidy(tools)
    budget = config.iso.size - IMAGE_OVERHEAD
    groups: list[list[FileRecord]] = []
    used = budget + 1
    for record in _candidates(tools, older_than, prefix, report):
        cost = _cost(record)
        if cost > budget:
            report.skipped.append((record.path, f"too large for one image of iso.size={config.iso.size} bytes"))
            continue
        if used + cost > budget:
            groups.append([])
            used = 0
        groups[-1].append(record)
        used += cost
    if dry_run:
        report.packed = [r.path for group in groups for r in group]
        return report
    if groups:
        os.makedirs(directory, exist_ok=True)
        command = mkisofs_command()
    for group in groups:
        _pack_one(tools, command, directory, group, report)
    return report


def _cost(record: FileRecord) -> int:
    return -(-record.size // SECTOR) * SECTOR + PER_FILE_OVERHEAD + SECTOR * record.path.count("/")


def _candidates(tools: Tools, older_than: Optional[float], prefix: Optional[str],
                report: PackReport) -> Iterator[FileRecord]:
    from .manage import list_files  # manage imports this module

    for record in list_files(tools, prefix=prefix, older_than_seconds=older_than):
        reason = _unpackable(tools, record)
        if reason is None:
            yield record
        elif reason:
            report.skipped.append((record.path, reason))


def _unpackable(tools: Tools, record: FileRecord) -> Optional[str]:
    """Why `record` is not packed ("" for an already packed one), or None."""
    if record.image:
        return ""
    if record.ref or record.blob:
        return "deduplicated (its bytes are shared with other paths)"
    if record.encrypted:
        return "stored encrypted"
    if record.expires is not None:
        return "expires (expiry frees its space on disk; an image is never rewritten)"
    if record.size > MAX_FILE:
        return "4 GiB or larger (one ISO extent at most)"
    st = tools.store.stat(record.path)
    if st is None:
        return "no file at its path"
    if not record_matches(record, st):
        return "changed on disk since its row was written (run hmacfs reindex)"
    return None


def _pack_one(tools: Tools, command: list[str], directory: str, group: list[FileRecord],
              report: PackReport) -> None:
    """Stage, build, verify and commit one image."""
    token = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
    stem = tools.config.iso.containerfile or "hmacfs"
    image = os.path.join(directory, f"{stem}-{token}.iso")
    # Hard links need the store's filesystem; the image itself may go to another one.
    staging = os.path.join(tools.store.internal, f"iso-staging-{token}")
    temp = os.path.join(directory, f".{stem}-{token}.iso.tmp")
    identities: dict[str, tuple[int, int, int, int]] = {}
    charset = tools.config.iso.charset
    try:
        root = os.path.join(staging, "root")
        for record in group:
            # Staged under names already in `charset`: the tool is told input = output charset,
            # so it copies the bytes into Rock Ridge as they are (it converts only from UTF-8
            # to UTF-8 itself; its other converters refuse Rock Ridge).
            try:
                dest = os.path.join(os.fsencode(root), *(seg.encode(charset) for seg in record.path.split("/")))
            except (UnicodeEncodeError, LookupError):
                report.skipped.append((record.path, f"its name cannot be written in iso.charset={charset}"))
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                tools.store.link_out(record.path, dest)  # type: ignore[arg-type]
            except FileNotFoundError:
                report.skipped.append((record.path, "removed while packing"))
                continue
            identities[record.path] = _identity(os.lstat(dest))
        if not identities:
            return
        _build(command, charset, root, temp)
        size = os.stat(temp).st_size
        if size > tools.config.iso.size:
            raise IsoPackError(f"the image came out at {size} bytes, more than iso.size={tools.config.iso.size}")
        os.rename(temp, image)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(temp):
            os.unlink(temp)
    entries = _read_back(image, tools.config.iso.charset)
    count = total = 0
    for record in group:
        if record.path not in identities:
            continue
        entry = entries.get(record.path)
        if entry is None or entry.size != record.size or _slice_sha256(image, entry) != record.sha256:
            report.skipped.append((record.path, "its copy in the image does not match (left on disk)"))
            continue
        if _commit(tools, record, identities[record.path], image, entry):
            report.packed.append(record.path)
            count += 1
            total += record.size
        else:
            report.skipped.append((record.path, "changed while packing (left on disk)"))
    report.images.append({"image": image, "size": os.stat(image).st_size, "files": count, "bytes": total})


def _build(command: list[str], charset: str, root: str, out: str) -> None:
    """Rock Ridge (-R) keeps the names whole, in `charset` (the staged names are already in it); -D
    keeps deep trees in place (no RR_MOVED relocation for the reader to follow); ISO level 3
    lifts the 8.3 identifiers;
    -no-pad drops the 300 KiB of zeros both tools append by default (iso.size is a budget)."""
    args = [*command, "-quiet", "-no-pad", "-R", "-D", "-iso-level", "3", "-input-charset", charset,
            "-output-charset", charset, "-V", "HMACFS", "-o", out, root]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise IsoPackError(f"{os.path.basename(command[0])} took longer than {TOOL_TIMEOUT} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        tail = " ".join(lines if len(lines) <= 3 else [*lines[:2], "...", lines[-1]])
        raise IsoPackError(f"{os.path.basename(command[0])} failed ({done.returncode}): {tail}")
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_back(image: str, charset: str) -> dict[str, IsoEntry]:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return {e.path: e for e in read_entries(fd, charset)}
    except IsoError as e:
        raise IsoPackError(f"{image}: the new image does not read back: {e}") from None
    finally:
        os.close(fd)


def _slice_sha256(image: str, entry: IsoEntry) -> str:
    digest = hashlib.sha256()
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset, end = entry.offset, entry.offset + entry.size
        while offset < end:
            block = os.pread(fd, min(1024 * 1024, end - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _commit(tools: Tools, record: FileRecord, identity: tuple[int, int, int, int], image: str,
            entry: IsoEntry) -> bool:
    """The row first (it serves the image's bytes from then on), then the file leaves the tree."""
    with tools.meta.transaction():
        current = tools.meta.fresh(record.path)
        st = tools.store.stat(record.path)
        if (current is None or current != record or st is None or _identity(st) != identity):
            return False
        tools.meta.put(replace(current, image=image, image_offset=entry.offset))
    _remove_leftover(tools, record.path, identity)
    return True


def _remove_leftover(tools: Tools, path: str, identity: tuple[int, int, int, int]) -> None:
    """Take the packed file out of the served tree; an upload that replaced it in the moment
    between the check and the move is put back (a link: never over something newer)."""
    trash = tools.store.detach(path)
    if trash is None:
        return
    if _identity(os.lstat(trash)) != identity:
        try:
            os.link(trash, tools.store.full_path(path))
        except OSError:
            pass
    tools.store.discard_temp(trash)


def _tidy(tools: Tools) -> int:
    """Files still at the path of a packed row (a pack interrupted after its commit): removed."""
    count = 0
    for record in _packed_rows(tools):
        st = tools.store.stat(record.path)
        if st is not None and record_matches(record, st):
            _remove_leftover(tools, record.path, _identity(st))
            count += 1
    return count


def _packed_rows(tools: Tools) -> Iterator[FileRecord]:
    """Every packed row, by path, a page at a time (memory stays flat)."""
    after = ""
    while True:
        page = tools.meta.packed(after=after, limit=PAGE)
        if not page:
            return
        yield from page
        after = page[-1].path


# -- list and verify ---------------------------------------------------------------------------------

def packed_by_image(tools: Tools) -> dict[str, list[FileRecord]]:
    """Packed rows grouped by image, with every image file in the directory (empty ones too)."""
    images: dict[str, list[FileRecord]] = {}
    directory = iso_directory(tools)
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".iso") and not name.startswith("."):
                images[os.path.join(directory, name)] = []
    for record in _packed_rows(tools):
        images.setdefault(record.image or "", []).append(record)
    return images


def listing(tools: Tools) -> list[dict]:
    out = []
    for image, records in packed_by_image(tools).items():
        try:
            size: Optional[int] = os.stat(image).st_size
        except OSError:
            size = None
        out.append({"image": image, "size": size, "files": [
            {"path": r.path, "size": r.size, "offset": r.image_offset, "sha256": r.sha256} for r in records]})
    return out


def verify(tools: Tools) -> list[tuple[str, str]]:
    """(path, problem) for every packed file whose bytes, re-read from its image, do not match
    its row; the image's own directory must also place the file where the row says."""
    problems: list[tuple[str, str]] = []
    charset = tools.config.iso.charset
    for image, records in packed_by_image(tools).items():
        try:
            entries = _read_back(image, charset)
        except (OSError, IsoPackError) as e:
            problems += [(r.path, f"image unreadable: {e}") for r in records]
            continue
        for record in records:
            entry = entries.get(record.path)
            if entry is None or entry.offset != record.image_offset or entry.size != record.size:
                problems.append((record.path, f"not where its row says in {image}"))
            elif _slice_sha256(image, entry) != record.sha256:
                problems.append((record.path, f"sha256 mismatch in {image}"))
    return problems
