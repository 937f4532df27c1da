"""Configuration: one TOML file -> frozen, validated settings.

Strategy: a single schema table lists every key with its section, kind, default and
aliases. Keys are matched case-insensitively with `_` ignored, so the seeds' configs
(`ListenPort`, flat top-level keys), hmac-file-server 3.x configs (`listen_address`,
`[logging]`) and our own spelling all land on one canonical key. Nothing is silently
ignored: an unknown key produces a warning with the nearest known key, and
`strictconfig` turns warnings into an error. Keys kept only so that old configs load
are marked `compat` and reported as having no effect.
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, make_dataclass
from typing import Any, Callable, Mapping, Optional

from .errors import ConfigError
from .units import format_duration, format_size, parse_duration, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only (tests/integration/test_any_host.py)
    # An installed tomli wins (the operator may have a newer one); otherwise the copy vendored in
    # hmacfs/_vendor, so that the single-file build reads its config on a bare Python 3.9 host.
    try:
        import tomli as tomllib
    except ImportError:
        from ._vendor import tomli as tomllib

PLACEHOLDER_SECRETS = frozenset({
    "", "changeme", "change-me", "secret", "your-secret-key", "your-secure-secret-key",
    "your-super-secret-hmac-key-here-minimum-32-characters", "change-me-to-a-long-random-string",
})


@dataclass(frozen=True)
class Key:
    """One configuration key of the schema."""

    section: str
    name: str
    kind: str  # str bool int size optsize duration list listen unixsocket secret
    default: Any
    aliases: tuple[str, ...] = ()  # "alias" (same section) or "section.alias"
    help: str = ""
    compat: bool = False  # accepted so old configs load; no effect in hmacfs
    secret: bool = False


def _k(section: str, name: str, kind: str, default: Any, *aliases: str, help: str = "",
       compat: bool = False, secret: bool = False) -> Key:
    return Key(section, name, kind, default, tuple(aliases), help, compat, secret)


SCHEMA: tuple[Key, ...] = (
    # [server] (these may also stand at the top level of the file)
    _k("server", "listenport", "listen", "8080", "listenaddress", help="port, :port, host:port or [v6]:port"),
    _k("server", "bindip", "str", "", help="address to bind when listenport is only a port"),
    _k("server", "unixsocket", "unixsocket", False, help="true or a socket path"),
    _k("server", "storagepath", "str", "./data", "storedir", "storagedir"),
    _k("server", "urlprefix", "str", "/upload/", "uploadsubdir"),
    _k("server", "loglevel", "str", "info", "logging.level"),
    _k("server", "logfile", "str", "", "logging.file"),
    _k("server", "logmaxsize", "size", "100MB", "logging.maxsize", help="rotate the log file at this size (0: never)"),
    _k("server", "logbackups", "int", 5, "logging.maxbackups"),
    _k("server", "loggingjson", "bool", False, "logjson"),
    _k("server", "metricsenabled", "bool", True),
    _k("server", "metricsport", "listen", "9090"),
    _k("server", "metricspath", "str", "/metrics"),
    _k("server", "metricstoken", "secret", "", secret=True,
       help="bearer token the metrics path requires (Authorization: Bearer ...); empty: none"),
    _k("server", "metricsallowips", "list", [], help="CIDRs that may read the metrics path; empty: everyone"),
    _k("server", "minfreebytes", "size", "1GB"),
    _k("server", "filettl", "duration", "30d", "maxfileage"),
    _k("server", "filettlenabled", "bool", False),
    _k("server", "autoadjustworkers", "bool", True, "enabledynamicworkers"),
    _k("server", "networkevents", "bool", False, "uploads.networkevents"),
    _k("server", "pidfilepath", "str", "", "pidfile"),
    _k("server", "precaching", "bool", False, "precache"),
    _k("server", "trustedproxies", "list", []),
    _k("server", "strictconfig", "bool", False),
    _k("server", "maxconnections", "int", 1024, help="open connections; beyond it 503"),
    _k("server", "maxconnectionsperip", "int", 64,
       help="open connections from one client address (0: no cap; trusted proxies are exempt)"),
    _k("server", "maxheaderbytes", "size", "64KB", help="request line + headers"),
    _k("server", "cleanupinterval", "duration", "1h", "janitorinterval",
       help="how often the janitor removes expired files, stale temp files and unreferenced blobs"),
    _k("server", "precacheworkers", "int", 4, compat=True),
    _k("server", "precacheinterval", "duration", "1h", compat=True),
    _k("server", "globalextensions", "list", [], compat=True),
    _k("server", "filenaming", "str", "original", compat=True),
    _k("server", "forceprotocol", "str", "", compat=True),
    _k("server", "workerscaleupthresh", "int", 50, compat=True),
    _k("server", "workerscaledownthresh", "int", 10, compat=True),
    _k("server", "loggingenabled", "bool", True, compat=True),
    # [deduplication]
    _k("deduplication", "enabled", "bool", False, "server.deduplicationenabled"),
    _k("deduplication", "directory", "str", ""),
    # [thumbnails]
    _k("thumbnails", "enabled", "bool", False),
    _k("thumbnails", "directory", "str", ""),
    _k("thumbnails", "size", "str", "200x200"),
    _k("thumbnails", "thumbnailintervalscan", "duration", "1h", "scaninterval"),
    # [iso]
    _k("iso", "enabled", "bool", False),
    _k("iso", "size", "size", "1TB"),
    _k("iso", "mountpoint", "str", ""),
    _k("iso", "charset", "str", "utf-8"),
    _k("iso", "containerfile", "str", ""),
    # [timeouts]
    _k("timeouts", "readtimeout", "duration", "3600s"),
    _k("timeouts", "writetimeout", "duration", "3600s"),
    _k("timeouts", "idletimeout", "duration", "3600s"),
    _k("timeouts", "readheadertimeout", "duration", "60s", help="time to send the request headers"),
    _k("timeouts", "shutdown", "duration", "30s", "shutdowntimeout"),
    # [security]
    _k("security", "secret", "secret", "", "server.secret", secret=True),
    _k("security", "secretfile", "str", ""),
    _k("security", "previoussecrets", "list", [], secret=True),
    _k("security", "jwtsecret", "secret", "", "jwtkey", secret=True),
    _k("security", "jwtalgorithm", "str", "HS256"),
    _k("security", "enablejwt", "bool", True, compat=True),
    _k("security", "jwtexpiration", "duration", "24h", "jwtexpiry", compat=True),
    _k("security", "deletesecret", "secret", "", secret=True),
    _k("security", "ratelimitingenabled", "bool", False, "server.ratelimitingenabled"),
    _k("security", "maxrequestsperminute", "int", 120, "server.maxrequestsperminute",
       help="requests per client address (and per JWT sub) per minute, in bursts up to that many"),
    _k("security", "ratelimitexempt", "list", [], help="CIDRs never rate limited"),
    _k("security", "banenabled", "bool", False),
    _k("security", "banthreshold", "int", 10, help="auth failures within banwindow that ban the address"),
    _k("security", "banwindow", "duration", "10m"),
    _k("security", "banduration", "duration", "1h"),
    _k("security", "allowips", "list", [], help="CIDRs allowed to use the server; empty: everyone"),
    _k("security", "denyips", "list", [], help="CIDRs refused (403)"),
    # [encryption]
    _k("encryption", "enabled", "bool", False),
    _k("encryption", "keyfile", "str", "", "key", secret=True),
    # [versioning]
    _k("versioning", "enableversioning", "bool", False, "server.enableversioning", "enabled"),
    _k("versioning", "maxversions", "int", 1, "server.maxversions"),
    # [quotas]
    _k("quotas", "enabled", "bool", False),
    _k("quotas", "peruser", "optsize", "", help="stored bytes per uploader (current files and versions)"),
    _k("quotas", "perday", "optsize", "", help="bytes one uploader may upload in 24 hours"),
    _k("quotas", "total", "optsize", "", "global", help="stored bytes in all (`global` in the contract)"),
    _k("quotas", "identity", "str", "jwt", help="jwt: the token's sub; firstsegment: the path's first segment"),
    # [uploads]
    _k("uploads", "maxuploadsize", "size", "100MB", "server.maxuploadsize", "maxfilesize"),
    _k("uploads", "allowedextensions", "list", []),
    _k("uploads", "blockedextensions", "list", []),
    _k("uploads", "resumableuploadsenabled", "bool", True),
    _k("uploads", "chunkeduploadsenabled", "bool", True, "server.chunkeduploadsenabled"),
    _k("uploads", "chunksize", "size", "32MB"),
    _k("uploads", "resumableexpiry", "duration", "24h", "maxresumableage"),
    _k("uploads", "interimresponses", "str", "direct",
       help="104 Upload Resumption Supported: always, direct (not to trusted proxies) or never"),
    # [downloads]
    _k("downloads", "resumabledownloadsenabled", "bool", True),
    _k("downloads", "chunkeddownloadsenabled", "bool", True),
    _k("downloads", "chunksize", "size", "32MB"),
    _k("downloads", "requiresignature", "bool", False),
    _k("downloads", "allowedextensions", "list", [], compat=True),
    # [clamav]
    _k("clamav", "clamavenabled", "bool", False, "server.clamavenabled", "enabled"),
    _k("clamav", "clamavsocket", "str", "/var/run/clamav/clamd.ctl"),
    _k("clamav", "numscanworkers", "int", 2),
    _k("clamav", "scanfileextensions", "list", []),
    _k("clamav", "maxscansize", "size", "100MB"),
    _k("clamav", "failopen", "bool", False),
    _k("clamav", "largefiles", "str", "reject",
       help="files larger than maxscansize: reject (413) or store (stored unscanned)"),
    # [redis]
    _k("redis", "redisenabled", "bool", False, "server.redisenabled", "enabled"),
    _k("redis", "redisaddr", "str", "localhost:6379"),
    _k("redis", "redispassword", "secret", "", secret=True),
    _k("redis", "redisdbindex", "int", 0),
    _k("redis", "redishealthcheckinterval", "duration", "30s"),
    _k("redis", "rediskeyprefix", "str", "hmacfs:", help="every key under it: several deployments share one Redis"),
    _k("redis", "rediscafile", "str", "", help="CA bundle for a rediss:// server (default: the system's)"),
    # [storage]
    _k("storage", "backend", "str", "local"),
    _k("storage", "s3endpoint", "str", ""),
    _k("storage", "s3bucket", "str", ""),
    _k("storage", "s3region", "str", "us-east-1"),
    _k("storage", "s3accesskey", "secret", "", secret=True),
    _k("storage", "s3secretkey", "secret", "", secret=True),
    _k("storage", "s3prefix", "str", ""),
    _k("storage", "s3redirect", "bool", False, help="downloads answer 302 to a presigned S3 URL"),
    _k("storage", "s3addressing", "str", "auto", help="path, virtual (bucket.host) or auto (path for IPs)"),
    _k("storage", "s3credentialsfile", "str", "",
       help="AWS shared credentials file (default $AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials)"),
    _k("storage", "s3cafile", "str", "", help="CA bundle for an https endpoint (default: the system's)"),
    _k("storage", "s3partconcurrency", "int", 4, help="multipart parts uploaded at once per upload"),
    # [cors]
    _k("cors", "allowedorigins", "list", ["*"]),
    # [workers]
    _k("workers", "numworkers", "int", 4),
    _k("workers", "uploadqueuesize", "int", 5000),
    # [file], [build]
    _k("file", "filerevision", "int", 1),
    _k("build", "version", "str", "", compat=True),
)

# Sections whose every key is accepted and ignored (hmac-file-server 3.x features that
# hmacfs does differently); they are reported once as having no effect.
COMPAT_SECTIONS = frozenset({"networkresilience"})
# Sections that hold only aliases of keys that live elsewhere (hmac-file-server 3.x [logging]).
ALIAS_SECTIONS = frozenset({"logging"})
LOGGING_COMPAT_KEYS = frozenset({"maxage", "compress"})

SECTIONS = tuple(dict.fromkeys(k.section for k in SCHEMA))

# Capabilities whose keys load and validate today but whose feature arrives in a later
# release. Turning one on must never look like it worked: each is reported as a warning
# at start and by check-config.
NOT_YET_IMPLEMENTED: dict[tuple[str, str], str] = {}


def norm(key: str) -> str:
    """Canonical spelling of a key: case-insensitive, `_` ignored."""
    return key.replace("_", "").lower()


def _build_index() -> dict[tuple[str, str], Key]:
    index: dict[tuple[str, str], Key] = {}
    for key in SCHEMA:
        index[(key.section, key.name)] = key
        for alias in key.aliases:
            sect, _, name = alias.rpartition(".")
            index[(sect or key.section, name)] = key
    return index


INDEX = _build_index()
KEY_BY_NAME: dict[str, Key] = {}  # any spelling -> its key, for suggestions across sections
for (_section, _name), _key in INDEX.items():
    KEY_BY_NAME.setdefault(_name, _key)


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: TCP (host, port) or a Unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def is_loopback(self) -> bool:
        if self.unix_path:
            return True
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host or '*'}:{self.port}"


def parse_listen(value: str, bindip: str = "") -> ListenAddress:
    """`"8080"`, `":8080"`, `"127.0.0.1:8080"`, `"[::1]:8080"` -> ListenAddress."""
    text = str(value).strip()
    host, port_text = "", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError("an IPv6 address needs the form \"[::1]:8080\"")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: \"[::1]:8080\"")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("a port 0-65535, optionally with an address (\"127.0.0.1:8080\")")
    host = host or bindip
    if host and host != "localhost":
        ipaddress.ip_address(host)  # raises ValueError naming a bad address
    return ListenAddress(host=host, port=int(port_text))


def _convert(key: Key, value: Any) -> Any:
    kind = key.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ValueError("true or false")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("a whole number")
        return int(value)
    if kind == "size":
        return parse_size(value)
    if kind == "optsize":  # "" or 0: no limit
        return 0 if value in ("", None) else parse_size(value)
    if kind == "duration":
        return parse_duration(value)
    if kind == "list":
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("a list of strings")
        return list(value)
    if kind == "unixsocket":
        if isinstance(value, (bool, str)):
            return value
        raise ValueError("true, false or a socket path")
    if kind == "listen":
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError("a port or host:port string")
        parse_listen(value)
        return value
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _section_class(section: str) -> type:
    fields = [(k.name, Any, dataclasses.field(default=None)) for k in SCHEMA if k.section == section]
    return make_dataclass(section.capitalize(), fields, frozen=True)


SECTION_CLASSES = {s: _section_class(s) for s in SECTIONS}


@dataclass(frozen=True)
class Config:
    """The effective configuration: one frozen object per section plus derived values."""

    sections: Mapping[str, Any]
    source: str = ""
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()  # enabled features not implemented yet (always reported)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(name) from None

    # Derived values: computed from sections, never stored twice.
    @property
    def listen(self) -> ListenAddress:
        s = self.sections["server"]
        sock = s.unixsocket
        if sock is True:
            return ListenAddress(unix_path=s.listenport if "/" in s.listenport else "hmacfs.sock")
        if isinstance(sock, str) and sock:
            return ListenAddress(unix_path=sock)
        return parse_listen(s.listenport, s.bindip)

    @property
    def metrics_listen(self) -> Optional[ListenAddress]:
        s = self.sections["server"]
        if not s.metricsenabled:
            return None
        return parse_listen(s.metricsport, s.bindip)

    @property
    def urlprefix(self) -> str:
        return normalize_prefix(self.sections["server"].urlprefix)

    @property
    def secrets(self) -> tuple[bytes, ...]:
        """HMAC keys for v/v2/token/v3: current first, then previous ones (rotation)."""
        sec = self.sections["security"]
        return tuple(s.encode() for s in [sec.secret, *sec.previoussecrets] if s)

    @property
    def jwt_secrets(self) -> tuple[bytes, ...]:
        sec = self.sections["security"]
        return (sec.jwtsecret.encode(),) if sec.jwtsecret else self.secrets


def normalize_prefix(prefix: str) -> str:
    """"upload", "/upload", "/upload/" -> "/upload/"; "" or "/" -> "/"."""
    inner = prefix.strip().strip("/")
    return f"/{inner}/" if inner else "/"


def read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file with `tomllib`, else tomli (installed or vendored): a reader always exists."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _suggest(section: str, name: str) -> str:
    here = [n for (s, n) in INDEX if s == section]
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        key = INDEX[(section, close[0])]
        where = "" if key.section == section else f"[{key.section}] "
        return f"; did you mean {where}{key.name}?"
    close = difflib.get_close_matches(name, list(KEY_BY_NAME), n=1, cutoff=0.75)
    if close:
        key = KEY_BY_NAME[close[0]]
        return f"; did you mean [{key.section}] {key.name}?"
    return ""


def from_dict(raw: Mapping[str, Any], source: str = "<dict>",
              environ: Optional[Mapping[str, str]] = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError naming the key on any bad value."""
    environ = os.environ if environ is None else environ
    values: dict[tuple[str, str], Any] = {}
    origin: dict[tuple[str, str], str] = {}
    warnings: list[str] = []
    notes: list[str] = []

    def take(section: str, raw_key: str, value: Any, where: str) -> None:
        name = norm(raw_key)
        key = INDEX.get((section, name))
        if key is None and section == "logging" and name in LOGGING_COMPAT_KEYS:
            notes.append(f"{where}{raw_key} is accepted but has no effect in hmacfs")
            return
        if key is None and section in COMPAT_SECTIONS:
            return
        if key is None:
            warnings.append(f"unknown key {where}{raw_key}{_suggest(section, name)}")
            return
        target = (key.section, key.name)
        try:
            converted = _convert(key, value)
        except ValueError as e:
            raise ConfigError(f"{where}{raw_key} = {value!r}: expected {e}") from None
        if target in origin and values[target] != converted:
            raise ConfigError(f"{where}{raw_key} sets [{key.section}] {key.name} to a different value "
                              f"than {origin[target]} does")
        values[target] = converted
        origin[target] = f"{where}{raw_key}"
        if key.compat:
            notes.append(f"{where}{raw_key} is accepted for compatibility but has no effect in hmacfs")

    for raw_name, body in raw.items():
        if isinstance(body, dict):
            section = norm(raw_name)
            if section in COMPAT_SECTIONS:
                notes.append(f"[{raw_name}] is accepted for compatibility but has no effect in hmacfs")
            elif section not in SECTIONS and section not in ALIAS_SECTIONS:
                close = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.6)
                hint = f"; did you mean [{close[0]}]?" if close else ""
                warnings.append(f"unknown section [{raw_name}]{hint}")
                continue
            for k, v in body.items():
                take(section, k, v, f"[{raw_name}] ")
        else:
            take("server", raw_name, value=body, where="")

    # Secrets from a file or the environment, in that order of precedence after `secret`.
    sec_file = values.get(("security", "secretfile"), "")
    if not values.get(("security", "secret")):
        if sec_file:
            try:
                with open(sec_file, encoding="utf-8") as f:
                    values[("security", "secret")] = f.read().strip()
            except OSError as e:
                raise ConfigError(f"[security] secretfile = {sec_file!r}: {e.strerror}") from None
            except (ValueError, UnicodeDecodeError) as e:  # a NUL in the name, a file that is not UTF-8
                raise ConfigError(f"[security] secretfile = {sec_file!r}: {e}") from None
        elif environ.get("HMACFS_SECRET"):
            values[("security", "secret")] = environ["HMACFS_SECRET"]
    for env_name, target in (("AWS_ACCESS_KEY_ID", ("storage", "s3accesskey")),
                             ("AWS_SECRET_ACCESS_KEY", ("storage", "s3secretkey"))):
        if not values.get(target) and environ.get(env_name):
            values[target] = environ[env_name]
    _move_redis_password(values)

    sections = {}
    for section in SECTIONS:
        kwargs = {}
        for key in SCHEMA:
            if key.section == section:
                kwargs[key.name] = values.get((key.section, key.name), _convert(key, key.default))
        sections[section] = SECTION_CLASSES[section](**kwargs)

    pending = [f"[{sec}] {name} = true: {what} is not implemented in this version"
               for (sec, name), what in NOT_YET_IMPLEMENTED.items() if getattr(sections[sec], name)]
    config = Config(sections=sections, source=source, warnings=tuple(warnings), notes=tuple(notes),
                    pending=tuple(pending))
    _validate(config)
    if config.server.strictconfig and warnings:
        raise ConfigError("strictconfig: " + "; ".join(warnings))
    return config


INTERIM_MODES = ("always", "direct", "never")


def _validate(config: Config) -> None:
    """Cross-key rules that a single value cannot express."""
    _validate_guard(config.security)
    s, sec = config.server, config.security
    if s.loglevel.lower() not in ("debug", "info", "warn", "warning", "error"):
        raise ConfigError(f"[server] loglevel = {s.loglevel!r}: expected debug, info, warn or error")
    if sec.jwtalgorithm.upper() != "HS256":
        raise ConfigError(f"[security] jwtalgorithm = {sec.jwtalgorithm!r}: only HS256 is supported")
    try:
        listen = config.listen
        config.metrics_listen  # noqa: B018 - validates metricsport
    except ValueError as e:
        raise ConfigError(f"[server] listenport/metricsport: {e}") from None
    for name in ("trustedproxies", "metricsallowips"):
        _check_cidrs("server", name, getattr(s, name))
    if s.metricstoken and (len(s.metricstoken) < 16 or not all(33 <= ord(c) < 127 for c in s.metricstoken)):
        raise ConfigError("[server] metricstoken: at least 16 printable ASCII characters without spaces "
                          "(it travels in an Authorization header)")
    if config.workers.numworkers < 1:
        raise ConfigError(f"[workers] numworkers = {config.workers.numworkers}: must be at least 1")
    if config.workers.uploadqueuesize < 0:
        raise ConfigError("[workers] uploadqueuesize: must not be negative")
    if s.maxconnections < 1:
        raise ConfigError(f"[server] maxconnections = {s.maxconnections}: must be at least 1")
    if s.maxconnectionsperip < 0:
        raise ConfigError(f"[server] maxconnectionsperip = {s.maxconnectionsperip}: must be 0 (no cap) or more")
    if not sec.secret:
        raise ConfigError("[security] secret is empty: set secret, secretfile or HMACFS_SECRET")
    if sec.secret.lower() in PLACEHOLDER_SECRETS and not listen.is_loopback:
        raise ConfigError(f"[security] secret is the example placeholder {sec.secret!r}: "
                          "choose a long random secret (it is allowed only on loopback)")
    q = config.quotas
    if q.identity not in ("jwt", "firstsegment"):
        raise ConfigError(f"[quotas] identity = {q.identity!r}: expected jwt or firstsegment")
    if config.versioning.maxversions < 0:
        raise ConfigError(f"[versioning] maxversions = {config.versioning.maxversions}: must not be negative")
    if config.encryption.enabled and not config.encryption.keyfile:
        raise ConfigError("[encryption] enabled = true needs keyfile: a file of '<id> <64 hex chars>' lines")
    clamav = config.clamav
    if clamav.clamavenabled:
        from .services.clamav import parse_address

        try:
            parse_address(clamav.clamavsocket)
        except ValueError as e:
            raise ConfigError(f"[clamav] clamavsocket: {e}") from None
    if clamav.numscanworkers < 1:
        raise ConfigError(f"[clamav] numscanworkers = {clamav.numscanworkers}: must be at least 1")
    if clamav.largefiles not in ("reject", "store"):
        raise ConfigError(f"[clamav] largefiles = {clamav.largefiles!r}: expected reject or store")
    if config.uploads.interimresponses not in INTERIM_MODES:
        raise ConfigError(f"[uploads] interimresponses = {config.uploads.interimresponses!r}: expected "
                          f"{', '.join(INTERIM_MODES)}")
    if config.uploads.chunksize < 1:
        raise ConfigError("[uploads] chunksize: the largest PATCH body must be at least 1 byte (e.g. \"32MB\")")
    if config.uploads.resumableexpiry < 1:
        raise ConfigError("[uploads] resumableexpiry: at least 1s (e.g. \"24h\")")
    if config.server.cleanupinterval < 1:
        raise ConfigError("[server] cleanupinterval: at least 1s")
    from .services.thumbnails import parse_size  # WIDTHxHEIGHT, checked even while off

    try:
        parse_size(config.thumbnails.size)
    except ValueError as e:
        raise ConfigError(f"[thumbnails] size = {e}") from None
    if config.thumbnails.thumbnailintervalscan < 1:
        raise ConfigError("[thumbnails] thumbnailintervalscan: at least 1s (e.g. \"1h\")")
    _validate_cluster(config)


_URL_PASSWORD = re.compile(r"\A(rediss?://[^:@/]*):([^@/]*)@", re.IGNORECASE)


def _move_redis_password(values: dict) -> None:
    """A password in `redisaddr` (redis://:pw@host) becomes `redispassword`, a secret: masked by
    check-config and never in an error message, as a password must be."""
    addr = values.get(("redis", "redisaddr"))
    match = _URL_PASSWORD.match(addr) if isinstance(addr, str) else None
    if match is None:
        return
    from urllib.parse import unquote

    password = unquote(match.group(2))
    given = values.get(("redis", "redispassword"))
    if given and given != password:
        raise ConfigError("[redis] redisaddr holds a password and redispassword another: give it once")
    values[("redis", "redispassword")] = password
    scheme_and_user = match.group(1)
    user_given = not scheme_and_user.endswith("://")
    values[("redis", "redisaddr")] = scheme_and_user + ("@" if user_given else "") + addr[match.end():]


def _validate_cluster(config: Config) -> None:
    """[storage] backend and the S3 settings, and [redis]: checked when their feature is on."""
    st = config.storage
    if st.backend not in ("local", "s3"):
        raise ConfigError(f"[storage] backend = {st.backend!r}: expected local or s3")
    if st.s3addressing not in ("auto", "path", "virtual"):
        raise ConfigError(f"[storage] s3addressing = {st.s3addressing!r}: expected auto, path or virtual")
    if st.backend == "s3":
        scheme = st.s3endpoint.split("://", 1)[0] if "://" in st.s3endpoint else ""
        if scheme not in ("http", "https"):
            raise ConfigError(f"[storage] s3endpoint = {st.s3endpoint!r}: a URL with http:// or https:// "
                              "(e.g. \"https://s3.eu-west-1.amazonaws.com\" or \"http://127.0.0.1:9000\")")
        if not st.s3bucket:
            raise ConfigError("[storage] s3bucket: required with backend = \"s3\"")
        if st.s3partconcurrency < 1:
            raise ConfigError(f"[storage] s3partconcurrency = {st.s3partconcurrency}: at least 1")
        if config.uploads.chunksize < 5 * 1024 * 1024:
            raise ConfigError("[uploads] chunksize: the S3 backend's part size, at least 5MB (S3's smallest part)")
    if config.redis.redisenabled:
        from .services.redisconn import parse_redis_address

        try:
            parse_redis_address(config.redis.redisaddr, config.redis.redisdbindex)
        except ValueError as e:
            raise ConfigError(f"[redis] redisaddr = {config.redis.redisaddr!r}: {e}") from None
        if config.redis.rediscafile and not config.redis.redisaddr.startswith("rediss://"):
            raise ConfigError("[redis] rediscafile: only for a TLS server (redisaddr = \"rediss://host:port\")")
        if config.redis.redishealthcheckinterval <= 0:
            raise ConfigError("[redis] redishealthcheckinterval: more than 0 (e.g. \"30s\")")


def _validate_guard(sec: Any) -> None:
    """IP lists, rate limits and bans (policy/guard.py): numbers checked when their feature is on,
    so an old config that turns one off with a 0 still loads."""
    for name in ("allowips", "denyips", "ratelimitexempt"):
        _check_cidrs("security", name, getattr(sec, name))
    if sec.ratelimitingenabled and sec.maxrequestsperminute < 1:
        raise ConfigError(f"[security] maxrequestsperminute = {sec.maxrequestsperminute}: at least 1 "
                          "(or ratelimitingenabled = false)")
    if sec.banenabled:
        if sec.banthreshold < 1:
            raise ConfigError(f"[security] banthreshold = {sec.banthreshold}: at least 1 (or banenabled = false)")
        for name in ("banwindow", "banduration"):
            if getattr(sec, name) <= 0:
                raise ConfigError(f"[security] {name}: more than 0s (e.g. \"10m\")")


def _check_cidrs(section: str, name: str, items: list[str]) -> None:
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"[{section}] {name}: {item!r} is not an address or CIDR") from None


def load(path: str, environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read and validate the config file at `path`."""
    return from_dict(read_toml(path), source=path, environ=environ)


def render_effective(config: Config) -> str:
    """The effective config as TOML, secrets masked (for `check-config`)."""
    fmt: dict[str, Callable[[Any], str]] = {
        "size": lambda v: f'"{format_size(v)}"',
        "optsize": lambda v: f'"{format_size(v)}"' if v else '""',
        "duration": lambda v: f'"{format_duration(v)}"',
    }
    out = [f"# effective configuration from {config.source}"]
    for section in SECTIONS:
        out.append(f"\n[{section}]")
        obj = config.sections[section]
        for key in SCHEMA:
            if key.section != section or key.compat:
                continue
            value = getattr(obj, key.name)
            if key.secret and value:
                text = '"********"' if not isinstance(value, list) else _toml_value(["********"] * len(value))
            elif key.kind in fmt:
                text = fmt[key.kind](value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (list, str)):
                text = _toml_value(value)
            else:
                text = str(value)
            out.append(f"{key.name} = {text}")
    return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    import json

    def one(v: Any) -> str:  # TOML has no surrogate escapes (json's \ud800 pairs) and takes no raw DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")

    if isinstance(value, list):
        return "[" + ", ".join(one(v) for v in value) + "]"
    return one(value)
