"""The operator docs' own snippets that no peer program runs: hmacfs configs and shell checks.

Each hmacfs TOML block is fed to `hmacfs check-config` (valid, no unknown-key warnings),
and the "checking by hand" commands are run with bash, openssl and curl against a real
hmacfs, so what an operator pastes works.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hmacfs.units import parse_size
from tests.conftest import need_program
from tests.support.hmacfs_proc import REPO

from .docsnippets import DELETE_SECRET, HMACFS_SIZE_LIMIT, PUBLIC_URL, SECRET, SIZE_LIMIT, fill, snippet

pytestmark = [pytest.mark.xmpp, pytest.mark.timeout(60)]

TOML_SNIPPETS = [("prosody.md", "hmacfs-for-xmpp"), ("ejabberd.md", "hmacfs-for-ejabberd"),
                 ("metronome.md", "hmacfs-for-metronome"), ("reverse-proxy.md", "hmacfs-behind-proxy")]


@pytest.mark.parametrize(("doc", "name"), TOML_SNIPPETS)
def test_hmacfs_snippet_passes_check_config(doc: str, name: str, tmp_path: Path) -> None:
    text = snippet(doc, name).replace("/var/lib/hmacfs", str(tmp_path / "data"))
    if SECRET not in text:  # the proxy snippet leaves the secret to the XMPP pages
        text += f'\n[security]\nsecret = "{SECRET}"\n'
    config = tmp_path / "config.toml"
    config.write_text(text)
    out = subprocess.run([sys.executable, "-m", "hmacfs", "check-config", "-config", str(config)],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 warning(s)" in out.stderr + out.stdout, out.stderr


def test_size_limits_agree_between_snippets() -> None:
    """hmacfs's "100MB" is the 104857600 bytes that the XMPP servers' options are given."""
    assert parse_size(HMACFS_SIZE_LIMIT.strip('"')) == int(SIZE_LIMIT)
    for doc, name in TOML_SNIPPETS:
        assert f"maxuploadsize = {HMACFS_SIZE_LIMIT}" in snippet(doc, name), (doc, name)
    for doc, name in [("prosody.md", "prosody-file-share"), ("prosody.md", "prosody-upload-external-v1"),
                      ("prosody.md", "prosody-upload-external-v2"), ("ejabberd.md", "ejabberd-upload"),
                      ("metronome.md", "metronome")]:
        assert SIZE_LIMIT in snippet(doc, name), (doc, name)
    assert DELETE_SECRET in snippet("metronome.md", "hmacfs-for-metronome")


def test_check_by_hand_commands_work(hmacfs_factory) -> None:
    """docs/prosody.md's openssl + curl commands sign and upload a file that hmacfs accepts."""
    need_program("curl")
    need_program("openssl")
    hm = hmacfs_factory()
    script = fill(snippet("prosody.md", "check-by-hand"), {PUBLIC_URL: hm.base_url, SECRET: hm.secret})
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    statuses = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("HTTP/")]
    assert statuses == ["201", "200"], out.stdout
    assert out.stdout.rstrip().endswith("hello"), out.stdout
    assert (hm.storage / "check" / "hello.txt").read_bytes() == b"hello"
