"""Prosody 0.12 (Debian) in front of hmacfs, configured with the snippets of docs/prosody.md.

Three setups: mod_http_upload_external with protocol v1 (`?v=`) and v2 (`?v2=`), and
mod_http_file_share in external mode (JWT in the Authorization header). A real client
(slixmpp) logs in, discovers the service, requests slots and uploads to hmacfs.
"""
from __future__ import annotations

import time

import pytest

from tests.conftest import need_program
from tests.support.hmacfs_proc import DEFAULT_SECRET, merge

from . import flows, httpraw
from .conftest import Pool
from .docsnippets import HMACFS_SIZE_LIMIT, PUBLIC_URL, SECRET, SIZE_LIMIT, XMPP_DOMAIN, fill, hmacfs_overrides, snippet
from .flows import LIMIT, PAYLOAD, Setup
from .servers import Prosody

pytestmark = [pytest.mark.xmpp, pytest.mark.timeout(240)]

SNIPPETS = {"external-v1": "prosody-upload-external-v1", "external-v2": "prosody-upload-external-v2",
            "file-share": "prosody-file-share", "file-share-expiring": "prosody-file-share",
            "file-share-jwtsecret": "prosody-file-share"}
EXPIRES_AFTER = 5  # seconds, for the expiry test's own Prosody
JWT_SECRET = "a-separate-jwt-secret-0123"


def build(pool: Pool, name: str) -> Setup:
    """hmacfs + Prosody whose upload component is the doc snippet for `name`."""
    need_program("prosody")
    need_program("prosodyctl")
    config = hmacfs_overrides("prosody.md", "hmacfs-for-xmpp",
                              {SECRET: DEFAULT_SECRET, HMACFS_SIZE_LIMIT: str(LIMIT)})
    secret = DEFAULT_SECRET
    if name == "file-share-jwtsecret":
        config = merge(config, {"security": {"jwtsecret": JWT_SECRET}})
        secret = JWT_SECRET
    hmacfs = pool.hmacfs(name, config)
    values = {PUBLIC_URL: hmacfs.base_url, XMPP_DOMAIN: "localhost", SECRET: secret, SIZE_LIMIT: str(LIMIT)}
    if name.startswith("file-share"):
        values["7 * 86400"] = str(EXPIRES_AFTER if name == "file-share-expiring" else 3600)
    component = fill(snippet("prosody.md", SNIPPETS[name]), values)
    prosody = Prosody(pool.workdir(f"prosody-{name}"), component)
    pool.closers.append(prosody.stop)
    prosody.start()
    protocol = {"external-v1": "v", "external-v2": "v2"}.get(name, "jwt")
    return Setup(name=name, hmacfs=hmacfs, xmpp_port=prosody.port, service="upload.localhost",
                 protocol=protocol, refuses_over_limit=protocol == "jwt",
                 lowercase_escapes=protocol != "jwt", peer_log=prosody.log)


@pytest.fixture(params=["external-v1", "external-v2", "file-share"])
def setup(request: pytest.FixtureRequest, pool: Pool) -> Setup:
    return pool.get(request.param, build)


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


def test_v2_binds_the_content_type(pool: Pool) -> None:
    """A v2 slot for image/png cannot store text/html: the type is part of the MAC."""
    setup = pool.get("external-v2", build)
    slot = flows.get_slot(setup, len(PAYLOAD))
    reply = flows.put(slot, PAYLOAD, content_type="text/html")
    assert reply.status == 403, setup.explain("PUT with another Content-Type", reply, slot)
    assert not setup.stored(slot.get_url).exists()
    assert flows.put(slot, PAYLOAD).status == 201


def test_file_share_jwt_is_checked(pool: Pool) -> None:
    """A tampered Bearer token or a missing one is refused with 401 (WWW-Authenticate: Bearer)."""
    setup = pool.get("file-share", build)
    slot = flows.get_slot(setup, len(PAYLOAD))
    token = slot.headers["Authorization"]
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]  # last MAC character changed
    for header in (flipped, "Bearer x.y.z"):
        bad = flows.Slot(slot.put_url, slot.get_url, {"Authorization": header})
        reply = flows.put(bad, PAYLOAD)
        assert reply.status == 401, setup.explain("PUT with a bad JWT", reply, bad)
        challenge = reply.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Bearer"), setup.explain("401 without a Bearer challenge", reply, bad)
    assert not setup.stored(slot.get_url).exists()
    assert flows.put(slot, PAYLOAD).status == 201


def test_file_share_with_a_separate_jwtsecret(pool: Pool) -> None:
    """With `[security] jwtsecret` set, Prosody's http_file_share_secret is that secret, not `secret`."""
    flows.check_raw_put(pool.get("file-share-jwtsecret", build))


def test_file_share_expired_token_is_refused(pool: Pool) -> None:
    """A slot token past its `exp` (Prosody: 300 s after issue) gets 410, as docs/prosody.md says."""
    setup = pool.get("file-share", build)
    slot = flows.self_signed(setup, len(PAYLOAD), exp_in=-2)
    reply = flows.put(slot, PAYLOAD)
    assert reply.status == 410, setup.explain("PUT with an expired token", reply, slot)
    assert not setup.stored(slot.get_url).exists()


def test_file_share_expires_claim_is_honoured(pool: Pool) -> None:
    """http_file_share_expires_after becomes the JWT `expires`; after it the file is gone (410, later 404)."""
    setup = pool.get("file-share-expiring", build)
    slot = flows.get_slot(setup, len(PAYLOAD))
    claims = httpraw.jwt_claims(slot.headers["Authorization"].split(" ", 1)[1])
    assert claims["expires"] == claims["iat"] + EXPIRES_AFTER, claims
    reply = flows.put(slot, PAYLOAD)
    assert reply.status == 201, setup.explain("PUT", reply, slot)
    got = httpraw.request("GET", slot.get_url)
    checked_at = time.time()
    assert checked_at < claims["expires"], "machine too slow: the upload took longer than the expiry"
    assert got.status == 200 and got.body == PAYLOAD, setup.explain("GET before expiry", got, slot)
    seen = []
    deadline = claims["expires"] + 30
    while time.time() < deadline:
        status = httpraw.request("GET", slot.get_url).status
        seen.append((round(time.time() - claims["expires"], 2), status))
        if status != 200:
            break
        time.sleep(0.2)
    when, status = seen[-1]
    assert status in (404, 410), setup.explain(f"GET after the expires claim: {seen}")
    assert when > -1.0, setup.explain(f"file gone before its expires claim: {seen}")
