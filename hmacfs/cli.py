"""Command line: `hmacfs [-config FILE] [serve | sign | check-config | version | files | usage |
reindex | rekey | bans | iso]`.

Single-dash long options (`-config`, `-version`) are accepted as the seeds' Go server
spells them, next to the usual `--config`. The store-management verbs (`files list`,
`files delete`, `usage`, `reindex`, `rekey`, `bans list`, `bans remove`, `iso pack|list|verify`) work beside a running
server through the same metadata (see manage.py); they print what they did and exit 0, 2 for a usage or config
error, 1 when the store cannot be opened or the work fails.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence
from urllib.parse import quote

from . import __version__, auth
from . import config as config_mod
from .errors import ConfigError, StartupError
from .units import parse_duration

if TYPE_CHECKING:
    from .manage import Tools

VERBS = ("serve", "sign", "check-config", "version", "files", "usage", "reindex", "rekey", "bans", "iso")
MANAGE_VERBS = ("files", "usage", "reindex", "rekey", "bans", "iso")
SINGLE_DASH = {"-config": "--config", "-version": "--version", "-help": "--help"}


def _normalize_argv(argv: Sequence[str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        out.append(SINGLE_DASH.get(name, name) + (eq + value if eq else ""))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmacfs", description="Signed-URL file upload/download server "
                                "(XEP-0363 external upload service).")
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config file (also -config)")
    p.add_argument("--version", action="store_true", help="print the version and exit (also -version)")
    sub = p.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}")
    cfg_help = "TOML config file"
    serve = sub.add_parser("serve", help="run the server (the default)")
    serve.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    check = sub.add_parser("check-config", help="validate the config and print it with secrets masked")
    check.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    sub.add_parser("version", help="print the version")
    sign = sub.add_parser("sign", help="print a signed URL for PUT, GET or DELETE",
                          description="Mint a signed URL. For PUT with v/v2/token/jwt the size is "
                          "signed: give --size or --file. Prints the URL; for jwt also the header.")
    sign.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    sign.add_argument("path", nargs="?", help="signed path below the URL prefix, e.g. abc/photo.jpg "
                      "(default with --file: <random>/<file name>)")
    sign.add_argument("--method", "-X", default="PUT", choices=("PUT", "GET", "HEAD", "DELETE"))
    sign.add_argument("--protocol", "-p", choices=("v", "v2", "token", "v3", "jwt"),
                      help="default: v for PUT, v3 for GET/DELETE")
    sign.add_argument("--file", "-f", help="take size and content type from this file")
    sign.add_argument("--size", type=int, help="upload size in bytes")
    sign.add_argument("--type", dest="content_type", help="content type (v2/token/jwt sign it)")
    sign.add_argument("--expires-in", default="1h", help="validity of v3/jwt URLs (default 1h)")
    sign.add_argument("--file-expires-in", help="jwt: the file's own lifetime (the 'expires' claim)")
    sign.add_argument("--base-url", help="scheme://host[:port] the client uses (default: from listenport)")
    _add_manage_parsers(sub, cfg_help)
    return p


def _add_manage_parsers(sub, cfg_help: str) -> None:
    """`files list|delete`, `usage`, `reindex`, `rekey`: store management beside a running server."""
    files = sub.add_parser("files", help="list or delete stored files (works while the server runs)",
                           description="List or delete stored files through the server's metadata.")
    files_sub = files.add_subparsers(dest="files_verb", metavar="{list,delete}")
    listing = files_sub.add_parser("list", help="list stored files",
                                   description="List stored files (every given selector must match).")
    delete = files_sub.add_parser(
        "delete", help="delete stored files with their versions and blob references",
        description="Delete the selected files, their kept versions and their blob references (a "
        "deduplicated blob goes with its last reference). Needs a selector or paths; every given "
        "selector must match.")
    for parser in (listing, delete):
        parser.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
        parser.add_argument("--uploader", help="only files of this uploader (exact)")
        parser.add_argument("--prefix", help="only paths starting with this string (exact)")
        parser.add_argument("--older-than", metavar="DURATION",
                            help="only files stored longer ago than this, e.g. 30d, 12h, 0s")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    delete.add_argument("paths", nargs="*", metavar="PATH", help="signed paths to delete, e.g. abc/photo.jpg")
    delete.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    usage = sub.add_parser("usage", help="files and bytes per uploader and in all, logical and on disk")
    usage.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    usage.add_argument("--json", action="store_true", help="print one JSON object")
    reindex = sub.add_parser("reindex", help="record metadata for files already in the store (adoption)",
                             description="Hash the files in the store that have no metadata (an adopted "
                             "prosody-filer directory) or stale metadata, and record sha256, size and type "
                             "by extension. Files are only read, never changed.")
    reindex.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    reindex.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    rekey = sub.add_parser("rekey", help="re-encrypt files under the keyfile's current key",
                           description="Re-encrypt every encrypted file (current files, kept versions, blobs) "
                           "whose key is not the keyfile's first one, so older keys can then be removed. "
                           "Reload (SIGHUP) or restart the server with the new keyfile first (it must know "
                           "the new key to read rekeyed files). Safe to interrupt and to run again.")
    rekey.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
    rekey.add_argument("--dry-run", action="store_true", help="list the files that would be re-encrypted")
    rekey.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    _add_bans_parsers(sub, cfg_help)
    _add_iso_parsers(sub, cfg_help)


def _add_iso_parsers(sub, cfg_help: str) -> None:
    """`iso pack|list|verify`: ISO containers ([iso]), beside a running server (hmacfs/iso.py)."""
    iso = sub.add_parser("iso", help="pack stored files into ISO 9660 images, list and verify them",
                         description="Move stored files into ISO 9660 images of at most iso.size bytes under "
                         "iso.mountpoint; they stay downloadable at their URLs (works while the server runs).")
    iso_sub = iso.add_subparsers(dest="iso_verb", metavar="{pack,list,verify}")
    pack = iso_sub.add_parser("pack", help="pack the selected files into new images")
    pack.add_argument("--older-than", metavar="DURATION", help="only files stored longer ago than this, e.g. 30d")
    pack.add_argument("--prefix", help="only paths starting with this string (exact)")
    pack.add_argument("--dry-run", action="store_true", help="print what would be packed; change nothing")
    listing = iso_sub.add_parser("list", help="list the images and the files packed in each")
    verify = iso_sub.add_parser("verify", help="re-read every packed file from its image and check its sha256")
    for parser in (pack, listing, verify):
        parser.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)
        parser.add_argument("--json", action="store_true", help="print one JSON document")


def _add_bans_parsers(sub, cfg_help: str) -> None:
    """`bans list`, `bans remove ADDR`: the bans of [security] banenabled, beside a running server."""
    bans = sub.add_parser("bans", help="list or lift bans after repeated auth failures (works while the server runs)",
                          description="The addresses banned after repeated authentication failures "
                          "([security] banenabled), as the server stores them.")
    bans_sub = bans.add_subparsers(dest="bans_verb", metavar="{list,remove}")
    listing = bans_sub.add_parser("list", help="list the bans in force")
    listing.add_argument("--json", action="store_true", help="print one JSON list")
    remove = bans_sub.add_parser("remove", help="lift a ban (a running server follows within a second)",
                                 description="Lift the ban of an address. An IPv6 address lifts the ban of "
                                 "its /64 (bans are kept per /64).")
    remove.add_argument("address", metavar="ADDR", help="an IPv4 or IPv6 address, or an IPv6 /64")
    for parser in (listing, remove):
        parser.add_argument("--config", "-c", dest="sub_config", metavar="FILE", help=cfg_help)


def _resolve_config_path(args: argparse.Namespace) -> Optional[str]:
    return getattr(args, "sub_config", None) or args.config


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(_normalize_argv(sys.argv[1:] if argv is None else argv))
    if args.version or args.verb == "version":
        print(f"hmacfs {__version__} (Python {sys.version.split()[0]})")
        return 0
    verb = args.verb or "serve"
    path = _resolve_config_path(args)
    if not path:
        print("hmacfs: give a config file with -config FILE (see --help)", file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load(path)
    except ConfigError as e:
        print(f"hmacfs: config error: {e}", file=sys.stderr)
        return 2
    if verb == "check-config":
        return _check_config(cfg)
    if verb == "sign":
        return _sign(cfg, args)
    if verb in MANAGE_VERBS:
        return _manage(cfg, args)
    return _serve(cfg)


def _report(cfg: config_mod.Config) -> None:
    for w in cfg.warnings:
        print(f"hmacfs: warning: {w}", file=sys.stderr)
    for n in cfg.notes:
        print(f"hmacfs: note: {n}", file=sys.stderr)
    for p in cfg.pending:
        print(f"hmacfs: warning: {p}", file=sys.stderr)


def _check_config(cfg: config_mod.Config) -> int:
    _report(cfg)
    sys.stdout.write(config_mod.render_effective(cfg))
    print(f"# OK: {cfg.source} is valid ({len(cfg.warnings)} warning(s))", file=sys.stderr)
    return 0


def _serve(cfg: config_mod.Config) -> int:
    import logging

    from .http.server import Service
    from .services.logs import setup_logging

    s = cfg.server
    setup_logging(s.loglevel, s.logfile, s.loggingjson, s.logmaxsize, s.logbackups)
    log = logging.getLogger("hmacfs")
    for w in cfg.warnings:
        log.warning("config: %s", w)
    for n in cfg.notes:
        log.info("config: %s", n)
    for p in cfg.pending:
        log.warning("config: %s", p)
    try:
        service = Service(cfg)
    except (OSError, StartupError) as e:
        log.error("cannot start: %s", e)
        return 1
    pidfile = s.pidfilepath
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        return service.run()
    finally:
        if pidfile:
            try:
                os.unlink(pidfile)
            except FileNotFoundError:
                pass


def _default_base_url(cfg: config_mod.Config) -> str:
    listen = cfg.listen
    if listen.unix_path:
        return "http://localhost"
    host = listen.host if listen.host and listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen.port}"


def _sign(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    method = args.method
    protocol = args.protocol or ("v" if method == "PUT" else "v3")
    size, ctype = args.size, args.content_type
    signed_path = args.path
    if args.file:
        size = os.path.getsize(args.file) if size is None else size
        ctype = ctype or mimetypes.guess_type(args.file)[0] or auth.DEFAULT_CONTENT_TYPE
        signed_path = signed_path or f"{uuid.uuid4()}/{os.path.basename(args.file)}"
    if not signed_path:
        print("hmacfs sign: give a path (or --file)", file=sys.stderr)
        return 2
    signed_path = signed_path.lstrip("/")
    ctype = ctype or auth.DEFAULT_CONTENT_TYPE
    now = int(time.time())
    try:
        expires = now + int(parse_duration(args.expires_in))
        file_expires = now + int(parse_duration(args.file_expires_in)) if args.file_expires_in else None
    except ValueError as e:
        print(f"hmacfs sign: {e}", file=sys.stderr)
        return 2
    base = (args.base_url or _default_base_url(cfg)).rstrip("/")
    url_path = cfg.urlprefix + "/".join(quote(seg, safe="") for seg in signed_path.split("/"))
    key = cfg.secrets[0]
    if protocol == "jwt":
        if method != "PUT" or size is None:
            print("hmacfs sign: jwt signs uploads: use -X PUT with --size or --file", file=sys.stderr)
            return 2
        slot, _, filename = signed_path.partition("/")
        claims = {"sub": "hmacfs-cli", "iat": now, "exp": expires, "slot": slot, "filename": filename,
                  "filesize": size, "filetype": ctype}
        if file_expires:
            claims["expires"] = file_expires
        print(base + url_path)
        print("Authorization: Bearer " + auth.jwt_encode(cfg.jwt_secrets[0], claims))
        return 0
    try:
        params = auth.sign_query(protocol, key, method=method, signed_path=signed_path,
                                 full_path=cfg.urlprefix + signed_path, size=size, content_type=ctype,
                                 expires=expires, delete_secret=cfg.security.deletesecret)
    except ValueError as e:
        print(f"hmacfs sign: {e}", file=sys.stderr)
        return 2
    query = "&".join(f"{k}={v}" for k, v in params.items())
    print(f"{base}{url_path}?{query}")
    if protocol in ("v2", "token") and method == "PUT":
        print(f"hmacfs sign: send the header 'Content-Type: {ctype}' with the PUT", file=sys.stderr)
    return 0


# -- store management -------------------------------------------------------------------------------

def _manage(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """Run one management verb; every failure is one line on stderr (no traceback)."""
    import sqlite3

    from . import manage
    from .errors import HTTPError

    sub_verb = getattr(args, f"{args.verb}_verb", None) if args.verb in ("files", "bans", "iso") else None
    verb = f"{args.verb} {sub_verb or ''}".strip()
    for w in cfg.warnings:
        print(f"hmacfs: warning: {w}", file=sys.stderr)
    if args.verb == "files" and not args.files_verb:
        print("hmacfs files: give 'list' or 'delete' (see hmacfs files --help)", file=sys.stderr)
        return 2
    if args.verb == "bans" and not args.bans_verb:
        print("hmacfs bans: give 'list' or 'remove ADDR' (see hmacfs bans --help)", file=sys.stderr)
        return 2
    if args.verb == "iso" and not args.iso_verb:
        print("hmacfs iso: give 'pack', 'list' or 'verify' (see hmacfs iso --help)", file=sys.stderr)
        return 2
    try:
        older_than = _older_than(args)
        if args.verb == "files" and args.files_verb == "delete":
            _check_selectors(args, older_than)
        tools = manage.open_store(cfg, keys=args.verb in ("reindex", "rekey"))
        try:
            if args.verb == "bans":
                return _bans(tools, args)
            if args.verb in ("reindex", "rekey", "iso"):
                manage.local_only(tools, f"hmacfs {verb}")
            if args.verb == "iso":
                return _iso(tools, args, older_than)
            if args.verb == "usage":
                return _usage(tools, args)
            if args.verb == "reindex":
                return _reindex(tools, args)
            if args.verb == "rekey":
                return _rekey(tools, args)
            if args.files_verb == "list":
                return _files_list(tools, args, older_than)
            return _files_delete(tools, args, older_than)
        finally:
            tools.close()
    except manage.UsageError as e:
        print(f"hmacfs {verb}: {e}", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"hmacfs {verb}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:  # rekey and reindex stop cleanly between files; a rerun goes on
        print(f"hmacfs {verb}: interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error, HTTPError, RuntimeError) as e:  # RuntimeError: iso.IsoPackError
        print(f"hmacfs {verb}: failed: {e}", file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """After the reader of stdout went away (`| head`): no second error when Python flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _older_than(args: argparse.Namespace) -> Optional[float]:
    from .manage import UsageError

    text = getattr(args, "older_than", None)
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise UsageError(f"--older-than {text!r}: {e}") from None


def _check_selectors(args: argparse.Namespace, older_than: Optional[float]) -> None:
    from .manage import UsageError, check_path

    if args.prefix == "":
        raise UsageError("--prefix must not be empty")
    if args.uploader is None and args.prefix is None and older_than is None and not args.paths:
        raise UsageError("refusing to delete without a selector: give --uploader, --prefix, --older-than or paths")
    args.paths = [check_path(p) for p in args.paths]


def _files_list(tools: Tools, args: argparse.Namespace, older_than: Optional[float]) -> int:
    from .manage import iso, list_files, record_json, show

    records = list_files(tools, args.uploader, args.prefix, older_than)
    if args.json:
        _print_json_list(record_json(r) for r in records)
        return 0
    rows = ((show(r.path), str(r.size), show(r.uploader) if r.uploader is not None else "-", iso(r.created) or "-",
             iso(r.expires) or "-") for r in records)
    _print_table(("PATH", "SIZE", "UPLOADER", "CREATED", "EXPIRES"), rows, right=(1,))
    return 0


def _print_json_list(items: Iterable[dict]) -> None:
    """One JSON list, written item by item (memory stays flat for any number of files)."""
    out = sys.stdout
    first = True
    for item in items:
        out.write(("[\n  " if first else ",\n  ") + json.dumps(item, ensure_ascii=False))
        first = False
    out.write("[]\n" if first else "\n]\n")


def _print_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = (),
                 sample: int = 10000) -> None:
    """Aligned columns; widths come from the header and the first `sample` rows, so any number of
    rows streams (a longer value further on just pushes its line)."""
    it: Iterator[Sequence[str]] = iter(rows)
    head: list[Sequence[str]] = []
    for row in it:
        head.append(row)
        if len(head) >= sample:
            break
    widths = [max([len(header[i])] + [len(r[i]) for r in head]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    print(line(header))
    for row in head:
        print(line(row))
    for row in it:
        print(line(row))


def _files_delete(tools: Tools, args: argparse.Namespace, older_than: Optional[float]) -> int:
    from .manage import delete_files, show

    missing: list[str] = []
    unselected: list[str] = []
    done = delete_files(tools, args.uploader, args.prefix, older_than, args.paths, args.dry_run,
                        missing=missing, unselected=unselected)
    for path in done:
        print(show(path))
    for path in missing:
        print(f"hmacfs files delete: not found: {show(path)}", file=sys.stderr)
    for path in unselected:
        print(f"hmacfs files delete: kept (does not match the selectors): {show(path)}", file=sys.stderr)
    if args.dry_run:
        print(f"hmacfs files delete: dry run: {len(done)} file(s) would be deleted; nothing was deleted",
              file=sys.stderr)
    else:
        print(f"hmacfs files delete: deleted {len(done)} file(s)", file=sys.stderr)
    return 1 if missing else 0


def _usage(tools: Tools, args: argparse.Namespace) -> int:
    from .manage import show, usage

    report = usage(tools)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    rows = [(show(u["uploader"]), str(u["files"]), str(u["bytes"])) for u in report["uploaders"]]
    if report["unattributed"]["files"]:
        rows.append(("(no uploader)", str(report["unattributed"]["files"]), str(report["unattributed"]["bytes"])))
    t = report["total"]
    rows.append(("total", str(t["files"]), str(t["logical_bytes"])))
    _print_table(("UPLOADER", "FILES", "BYTES"), rows, right=(1, 2))
    print(f"\non disk: {t['physical_bytes']} bytes in {t['inodes']} file(s); {t['blobs']} deduplicated blob(s) "
          f"of {t['blob_bytes']} bytes save {t['dedup_saved_bytes']} bytes")
    print("(files and bytes count current files and kept versions, at their plaintext size)")
    return 0


def _reindex(tools: Tools, args: argparse.Namespace) -> int:
    from .manage import reindex

    report = reindex(tools)
    if args.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    else:
        for problem in report.problems:
            print(f"hmacfs reindex: {problem}", file=sys.stderr)
        print(f"reindex: {report.scanned} file(s) scanned: {report.added} added, {report.updated} updated, "
              f"{report.unchanged} unchanged, {report.skipped} skipped")
    return 0


def _rekey(tools: Tools, args: argparse.Namespace) -> int:
    from .manage import rekey, show

    report = rekey(tools, args.dry_run)
    if args.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    else:
        for path in report.paths:
            print(show(path))
        for problem in report.problems:
            print(f"hmacfs rekey: {problem}", file=sys.stderr)
        current = tools.keyring.current_id
        if args.dry_run:
            print(f"rekey (dry run): {report.rekeyed} of {report.encrypted} encrypted file(s) would be re-encrypted "
                  f"under key {current!r}; nothing was changed", file=sys.stderr)
        else:
            print(f"rekey: {report.rekeyed} file(s) re-encrypted under key {current!r} ({report.names} name(s), "
                  f"{report.rows} row(s)), {report.relinked} relinked to their blob, {report.repaired} row(s) "
                  f"repaired, {report.current} already current, {report.failed} failed, {report.remaining} "
                  "left under an older key", file=sys.stderr)
    return 1 if report.failed or report.remaining else 0


def _bans(tools: Tools, args: argparse.Namespace) -> int:
    """`bans list` (those in force, the longest first) and `bans remove ADDR`."""
    from .manage import UsageError, iso
    from .policy.bans import ban_key

    now = time.time()
    if args.bans_verb == "list":
        bans = tools.meta.bans_active(now)
        if args.json:
            _print_json_list({"address": b.address, "until": iso(b.until), "created": iso(b.created),
                              "failures": b.failures, "reason": b.reason} for b in bans)
            return 0
        _print_table(("ADDRESS", "UNTIL", "SINCE", "FAILURES", "LAST FAILURE"),
                     ((b.address, iso(b.until) or "-", iso(b.created) or "-", str(b.failures), b.reason or "-")
                      for b in bans), right=(3,))
        return 0
    try:
        key = ban_key(args.address)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ban = tools.meta.ban_get(key)
    if not tools.meta.ban_remove(key) or ban is None or ban.until <= now:
        print(f"hmacfs bans remove: {key} is not banned", file=sys.stderr)
        return 1
    print(f"hmacfs bans remove: lifted the ban of {key} (a running server follows within a second)",
          file=sys.stderr)
    return 0


def _iso(tools: Tools, args: argparse.Namespace, older_than: Optional[float]) -> int:
    """`iso pack` (exit 1 when nothing could be packed of what was selected), `iso list`, and
    `iso verify` (exit 1 on any mismatch)."""
    from . import iso
    from .manage import UsageError, show

    if args.iso_verb == "pack":
        if args.prefix == "":
            raise UsageError("--prefix must not be empty")
        report = iso.pack(tools, older_than, args.prefix, args.dry_run)
        if args.json:
            print(json.dumps(report.as_dict(), ensure_ascii=False))
        for path, reason in report.skipped:
            print(f"hmacfs iso pack: skipped {show(path)}: {reason}", file=sys.stderr)
        if args.dry_run:
            print(f"hmacfs iso pack: dry run: {len(report.packed)} file(s) would be packed", file=sys.stderr)
            return 0
        for image in report.images:
            print(f"hmacfs iso pack: {image['image']}: {image['files']} file(s), {image['bytes']} bytes "
                  f"(image {image['size']} bytes)", file=sys.stderr)
        print(f"hmacfs iso pack: packed {len(report.packed)} file(s) into {len(report.images)} image(s)",
              file=sys.stderr)
        return 0
    if args.iso_verb == "list":
        images = iso.listing(tools)
        if args.json:
            print(json.dumps(images, ensure_ascii=False))
            return 0
        rows: list[Sequence[str]] = []
        for image in images:
            rows.append((image["image"], str(len(image["files"])), str(image["size"] if image["size"] is not None
                                                                      else "missing")))
            rows += [("  " + show(f["path"]), "", str(f["size"])) for f in image["files"]]
        _print_table(("IMAGE / PATH", "FILES", "BYTES"), rows, right=(1, 2))
        return 0
    problems = iso.verify(tools)
    if args.json:
        print(json.dumps([{"path": p, "problem": m} for p, m in problems], ensure_ascii=False))
    for path, problem in problems:
        print(f"hmacfs iso verify: {show(path)}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("hmacfs iso verify: every packed file matches its sha256", file=sys.stderr)
    return 0
