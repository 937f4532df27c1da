"""Pull the copy-paste configs out of docs/*.md so the tests run exactly what operators copy.

A snippet is a fenced code block containing the marker `hmacfs-snippet: NAME` (in a comment
of the block's language). Placeholders are the example values the docs use
(`https://share.example.org`, `example.org`, `CHANGE_ME_SHARED_SECRET`, sizes); `fill`
insists that each one it replaces is really there, so a doc edit cannot silently detach
the test from the text.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

DOCS = Path(__file__).resolve().parents[2] / "docs"
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)

PUBLIC_URL = "https://share.example.org"
XMPP_DOMAIN = "example.org"
SECRET = "CHANGE_ME_SHARED_SECRET"
DELETE_SECRET = "CHANGE_ME_DELETE_SECRET"
SIZE_LIMIT = "104857600"
HMACFS_SIZE_LIMIT = '"100MB"'  # the same limit as hmacfs's TOML snippets write it


def snippet(doc: str, name: str) -> str:
    """The one fenced block of docs/`doc` tagged `hmacfs-snippet: name`."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    marker = re.compile(rf"hmacfs-snippet:\s*{re.escape(name)}\s*$", re.M)
    blocks = [b for b in _FENCE.findall(text) if marker.search(b)]
    if len(blocks) != 1:
        raise AssertionError(f"docs/{doc}: expected one block tagged {name!r}, found {len(blocks)}")
    return blocks[0]


def fill(text: str, values: dict[str, str]) -> str:
    """Replace each placeholder (in the given order); every one must occur in `text`."""
    for placeholder, value in values.items():
        if placeholder not in text:
            raise AssertionError(f"placeholder {placeholder!r} missing from snippet:\n{text}")
        text = text.replace(placeholder, value)
    return text


def hmacfs_overrides(doc: str, name: str, values: dict[str, str]) -> dict[str, Any]:
    """A doc's hmacfs TOML snippet as config overrides, minus where it listens and stores.

    The fixture owns the port and the storage dir; everything else (prefix, secrets,
    limits, trusted proxies) comes from the doc.
    """
    config = tomllib.loads(fill(snippet(doc, name), values))
    server = config.get("server", {})
    for key in ("listenport", "storagepath"):
        server.pop(key, None)
    return config
