"""Command line: `hmacfs [-config FILE] [serve | sign | check-config | version]`.

Single-dash long options (`-config`, `-version`) are accepted as the seeds' Go server
spells them, next to the usual `--config`.
"""
from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import time
import uuid
from typing import Optional, Sequence
from urllib.parse import quote

from . import __version__, auth
from . import config as config_mod
from .errors import ConfigError, StartupError
from .units import parse_duration

VERBS = ("serve", "sign", "check-config", "version")
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
    sub = p.add_subparsers(dest="verb", metavar="{serve,sign,check-config,version}")
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
    return p


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
