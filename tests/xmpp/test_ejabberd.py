"""ejabberd 23.01 (Debian) mod_http_upload with external_secret, configured from docs/ejabberd.md.

ejabberd signs `?v=` over `<sha1(jid)>/<random>/<file name>` and rewrites the file name
(`(`, spaces → `_`), escaping the rest with uppercase hex.
"""
from __future__ import annotations

import hashlib
import urllib.parse

import pytest

from tests.conftest import need_program
from tests.support.hmacfs_proc import DEFAULT_SECRET

from . import flows
from .conftest import Pool
from .docsnippets import HMACFS_SIZE_LIMIT, PUBLIC_URL, SECRET, SIZE_LIMIT, fill, hmacfs_overrides, snippet
from .flows import LIMIT, PAYLOAD, Setup
from .servers import Ejabberd

pytestmark = [pytest.mark.xmpp, pytest.mark.timeout(240)]


def build(pool: Pool, name: str) -> Setup:
    """hmacfs + ejabberd whose mod_http_upload block is the doc snippet."""
    need_program("erl")
    need_program("ejabberdctl")  # the ejabberd package; its Erlang code is found by ejabberd_libs()
    hmacfs = pool.hmacfs(name, hmacfs_overrides("ejabberd.md", "hmacfs-for-ejabberd",
                                                {SECRET: DEFAULT_SECRET, HMACFS_SIZE_LIMIT: str(LIMIT)}))
    modules = fill(snippet("ejabberd.md", "ejabberd-upload"),
                   {PUBLIC_URL: hmacfs.base_url, SECRET: hmacfs.secret, SIZE_LIMIT: str(LIMIT)})
    ejabberd = Ejabberd(pool.workdir("ejabberd"), modules)
    pool.closers.append(ejabberd.stop)
    ejabberd.start()
    return Setup(name=name, hmacfs=hmacfs, xmpp_port=ejabberd.port, service="upload.localhost",
                 protocol="v", refuses_over_limit=True, lowercase_escapes=False, peer_log=ejabberd.log)


@pytest.fixture
def setup(pool: Pool) -> Setup:
    return pool.get("ejabberd", build)


def test_discovery_advertises_the_limit(setup: Setup) -> None:
    flows.check_discovery(setup)


def test_slixmpp_upload_then_get(setup: Setup) -> None:
    flows.check_slixmpp_upload(setup)


def test_slot_url_put_byte_for_byte(setup: Setup) -> None:
    flows.check_raw_put(setup)


def test_over_limit_is_refused(setup: Setup) -> None:
    flows.check_over_limit(setup)


def test_wrong_size_stores_nothing(setup: Setup) -> None:
    flows.check_wrong_size(setup)


def test_odd_file_names(setup: Setup) -> None:
    flows.check_file_names(setup)


def test_slot_path_is_what_ejabberd_documents(setup: Setup) -> None:
    """The stored path is sha1(bare JID)/random/mangled name, as docs/ejabberd.md tells operators."""
    slot = flows.get_slot(setup, len(PAYLOAD))
    assert flows.put(slot, PAYLOAD).status == 201
    rel = setup.stored(slot.get_url).relative_to(setup.hmacfs.storage).parts
    assert rel[0] == hashlib.sha1(setup.jid.encode()).hexdigest(), slot
    assert len(rel[1]) == 40, slot
    assert rel[2] == "Bildschirmfoto_2026-11-21_um_10.00.00__ä_.png", slot
    assert "%C3%A4" in slot.put_url, slot
    assert urllib.parse.urlsplit(slot.put_url).query.startswith("v="), slot
