"""Metronome's mod_http_upload_external against hmacfs, emulated (Metronome is not in Debian 12).

The doc's snippet is loaded by Prosody's own config parser (the format Metronome shares),
which proves it parses and yields the option values; the URLs are then built the way the
module's `magic_crypto_dust` builds them (`?token=` = HMAC over path\\0size\\0type for
PUT, path\\0deletesecret for DELETE; lowercase escapes) and sent to a real hmacfs.
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import need_program
from tests.support.hmacfs_proc import DEFAULT_SECRET, HmacfsProcess

from . import httpraw
from .docsnippets import (
    DELETE_SECRET,
    HMACFS_SIZE_LIMIT,
    PUBLIC_URL,
    SECRET,
    SIZE_LIMIT,
    XMPP_DOMAIN,
    fill,
    hmacfs_overrides,
    snippet,
)
from .flows import FILE_NAME, LIMIT, PAYLOAD

pytestmark = [pytest.mark.xmpp, pytest.mark.timeout(60)]

OPTIONS = ("component_module", "http_file_external_url", "http_file_secret", "http_file_size_limit",
           "http_file_external_delete_url", "http_file_delete_secret", "http_file_expire_after")
READ_CONFIG = """
package.path = "/usr/lib/prosody/?.lua;" .. package.path
package.cpath = "/usr/lib/prosody/?.so;" .. package.cpath
local cm = require "core.configmanager"
local ok, level, err = cm.load(arg[1])
if not ok then io.stderr:write(tostring(level) .. ": " .. tostring(err) .. "\\n"); os.exit(1) end
for i = 3, #arg do io.write(arg[i], "\\t", tostring(cm.get(arg[2], arg[i])), "\\n") end
"""
DELETE_SECRET_VALUE = "delete-secret-for-tests"


def hmacfs_config(with_delete: bool = True) -> dict:
    """The doc's hmacfs TOML for Metronome (optionally without its deletesecret)."""
    config = hmacfs_overrides("metronome.md", "hmacfs-for-metronome", {
        SECRET: DEFAULT_SECRET, DELETE_SECRET: DELETE_SECRET_VALUE, HMACFS_SIZE_LIMIT: str(LIMIT)})
    if not with_delete:
        del config["security"]["deletesecret"]
    return config


def lua_interpreter() -> str:
    """The Lua that Debian's prosody runs with (its shebang), which has Prosody's libraries."""
    prosody = need_program("prosody")
    shebang = Path(prosody).read_text(errors="replace").splitlines()[0]
    lua = shebang.split()[-1]
    return shutil.which(lua) or lua


def read_component(config: str, host: str, workdir: Path) -> dict[str, str]:
    """Option values of `host` in a Prosody/Metronome-style config, as the parser sees them."""
    (workdir / "read.lua").write_text(READ_CONFIG)
    (workdir / "metronome.cfg.lua").write_text(config)
    out = subprocess.run([lua_interpreter(), str(workdir / "read.lua"), str(workdir / "metronome.cfg.lua"), host,
                          *OPTIONS], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(line.split("\t", 1) for line in out.stdout.splitlines())


class Metronome:
    """URL construction of Metronome's mod_http_upload_external, from its parsed options."""

    def __init__(self, options: dict[str, str]) -> None:
        self.put_base = options["http_file_external_url"]
        self.delete_base = options["http_file_external_delete_url"]
        self.secret = options["http_file_secret"]
        self.delete_secret = options["http_file_delete_secret"]

    @staticmethod
    def random_dir() -> str:
        """Like the module's generate_directory: base64 without / and +, then 4 digits of the time."""
        bits = base64.b64encode(os.urandom(9)).decode().replace("/", "").replace("+", "")
        return bits + str(int(time.time()))[-4:]

    def slot(self, name: str, size: int, content_type: str) -> tuple[str, str, str]:
        """(put_url, get_url, delete_url) for one upload."""
        random_dir = self.random_dir()
        path = f"{random_dir}/{name}"
        quoted = f"{httpraw.prosody_quote(random_dir)}/{httpraw.prosody_quote(name)}"
        token = httpraw.mac(self.secret, f"{path}\0{size}\0{content_type}")
        delete_token = httpraw.mac(self.secret, f"{path}\0{self.delete_secret}")
        return (f"{self.put_base}{quoted}?token={token}", f"{self.put_base}{quoted}",
                f"{self.delete_base}{quoted}?token={delete_token}")


@pytest.fixture
def metronome_for(tmp_path: Path) -> Callable[[HmacfsProcess], Metronome]:
    """The doc's snippet pointed at a given hmacfs, parsed, as a URL builder."""
    def make(hm: HmacfsProcess) -> Metronome:
        config = fill(snippet("metronome.md", "metronome"), {
            PUBLIC_URL: hm.base_url, XMPP_DOMAIN: "localhost", SECRET: hm.secret,
            DELETE_SECRET: DELETE_SECRET_VALUE, SIZE_LIMIT: str(LIMIT)})
        options = read_component(config, "upload.localhost", tmp_path)
        assert options["component_module"] == "http_upload_external", options
        assert options["http_file_size_limit"] == str(LIMIT), options
        return Metronome(options)
    return make


def test_put_get_delete_as_metronome_signs_them(hmacfs_factory, metronome_for) -> None:
    hm = hmacfs_factory(hmacfs_config())
    metronome = metronome_for(hm)
    put_url, get_url, delete_url = metronome.slot(FILE_NAME, len(PAYLOAD), "image/png")
    assert "%c3%a4" in put_url
    reply = httpraw.request("PUT", put_url, PAYLOAD, {"Content-Type": "image/png"})
    assert reply.status == 201, (reply.status, reply.body, hm.log()[-3000:])
    got = httpraw.request("GET", get_url)
    assert got.status == 200 and got.body == PAYLOAD

    forged = delete_url.rsplit("=", 1)[0] + "=" + httpraw.mac(hm.secret, "other\0" + DELETE_SECRET_VALUE)
    assert httpraw.request("DELETE", forged).status == 403
    assert httpraw.request("GET", get_url).status == 200
    deleted = httpraw.request("DELETE", delete_url)
    assert deleted.status == 204, (deleted.status, deleted.body, hm.log()[-3000:])
    assert httpraw.request("GET", get_url).status == 404
    assert httpraw.request("DELETE", delete_url).status == 404


def test_token_binds_size_and_type(hmacfs_factory, metronome_for) -> None:
    hm = hmacfs_factory(hmacfs_config())
    metronome = metronome_for(hm)
    put_url, get_url, _ = metronome.slot(FILE_NAME, len(PAYLOAD), "image/png")
    assert httpraw.request("PUT", put_url, PAYLOAD, {"Content-Type": "text/html"}).status == 403
    assert httpraw.request("PUT", put_url, PAYLOAD[:-1], {"Content-Type": "image/png"}).status in (403, 413)
    assert httpraw.request("GET", get_url).status == 404
    big_put, _, _ = metronome.slot("big.bin", LIMIT + 1, "application/octet-stream")
    assert httpraw.request("PUT", big_put, b"z" * (LIMIT + 1)).status == 413  # no type: octet-stream signed


def test_delete_refused_without_deletesecret(hmacfs_factory, metronome_for) -> None:
    """hmacfs without `[security] deletesecret` must not accept Metronome delete tokens."""
    hm = hmacfs_factory(hmacfs_config(with_delete=False))
    metronome = metronome_for(hm)
    put_url, get_url, delete_url = metronome.slot(FILE_NAME, len(PAYLOAD), "image/png")
    assert httpraw.request("PUT", put_url, PAYLOAD, {"Content-Type": "image/png"}).status == 201
    assert httpraw.request("DELETE", delete_url).status == 403
    assert httpraw.request("GET", get_url).status == 200
