"""Where and as whom hmacfs talks to S3: the settings, the addressing style, the credentials.

Strategy: pure functions over the config and a given environment mapping (never `os.environ`
read behind the caller's back), so the AWS SDKs' lookup order is unit-tested as it is, and a
missing credential is a start-up error that names where it looked, never the secret.
"""
from __future__ import annotations

import configparser
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import urlsplit

_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to talk to S3. `addressing`: "path" (`host/bucket/key`), "virtual"
    (`bucket.host/key`) or "auto": path-style for an IP address or localhost (they have no
    per-bucket DNS names, and MinIO/moto on loopback expect it) and for bucket names that are
    not DNS labels; virtual-hosted otherwise, as AWS recommends."""

    endpoint: str
    bucket: str
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    addressing: str = "auto"
    ca_file: Optional[str] = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"S3 endpoint must be an http:// or https:// URL with a host, not {self.endpoint!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"S3 endpoint must not have a path or query: {self.endpoint!r}")
        if self.addressing not in ("path", "virtual", "auto"):
            raise ValueError(f"S3 addressing must be path, virtual or auto, not {self.addressing!r}")
        if not self.bucket:
            raise ValueError("S3 bucket name is empty")


def choose_addressing(host: str, bucket: str, addressing: str) -> str:
    """Resolve "auto" to "path" or "virtual" (see S3Settings)."""
    if addressing != "auto":
        return addressing
    try:
        ipaddress.ip_address(host.strip("[]"))
        return "path"
    except ValueError:
        pass
    if host == "localhost" or host.endswith(".localhost") or not _DNS_BUCKET.fullmatch(bucket):
        return "path"
    return "virtual"


def resolve_credentials(
    config_access: Optional[str],
    config_secret: Optional[str],
    environ: Mapping[str, str],
    credentials_file: Optional[str] = None,
    profile: str = "default",
) -> tuple[str, str, Optional[str]]:
    """(access key, secret key, session token) from, in order: the config, the environment
    (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the shared credentials
    file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile `AWS_PROFILE`), the
    order the AWS SDKs use minus what needs a network. A source counts only when it has both
    keys; ValueError names the places looked at when none has."""
    if config_access and config_secret:
        return config_access, config_secret, None
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return environ["AWS_ACCESS_KEY_ID"], environ["AWS_SECRET_ACCESS_KEY"], environ.get("AWS_SESSION_TOKEN") or None
    path = credentials_file or environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if not path:
        home = environ.get("HOME") or os.path.expanduser("~")
        path = os.path.join(home, ".aws", "credentials")
    profile = environ.get("AWS_PROFILE") or profile
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"S3 credentials file {path} is not readable INI: {exc.__class__.__name__}") from None
    if parser.has_section(profile):
        section = parser[profile]
        access, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if access and secret:
            return access.strip(), secret.strip(), (section.get("aws_session_token") or "").strip() or None
    raise ValueError(
        "no S3 credentials: set the access and secret key in the config, or AWS_ACCESS_KEY_ID and "
        f"AWS_SECRET_ACCESS_KEY, or profile [{profile}] in {path}"
    )
