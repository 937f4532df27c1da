"""The client flows every XMPP setup must pass, shared by the Prosody and ejabberd tests.

Each check logs in with slixmpp, gets a slot from the real XMPP server and talks to the
real hmacfs. Failure messages carry the exact slot (URL and headers) the server handed
out and the end of hmacfs's log, so a mismatch can be reported precisely.
"""
from __future__ import annotations

import io
import secrets
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from slixmpp.plugins.xep_0363.http_upload import FileTooBig

from tests.support.hmacfs_proc import HmacfsProcess

from . import httpraw, xmppclient
from .servers import DOMAIN, USERS
from .xmppclient import Slot, run, session

FILE_NAME = "Bildschirmfoto 2026-11-21 um 10.00.00 (ä).png"
LIMIT = 256 * 1024  # small, so over-limit bodies stay cheap; the docs' 100 MB is replaced by this
PAYLOAD = httpraw.png()


@dataclass
class Setup:
    """One XMPP server configured from a doc snippet, in front of its own hmacfs."""

    name: str
    hmacfs: HmacfsProcess
    xmpp_port: int
    service: str
    protocol: str  # "v", "v2" or "jwt": how the server signs slots
    refuses_over_limit: bool  # False: the server never answers an over-limit slot request
    lowercase_escapes: bool  # True: slot URLs use lowercase %xx (Prosody's util.http)
    peer_log: Callable[[], str] = field(default=lambda: "")
    user: str = "alice"

    @property
    def jid(self) -> str:
        return f"{self.user}@{DOMAIN}"

    @property
    def password(self) -> str:
        return USERS[self.user]

    def stored(self, get_url: str) -> Path:
        """Where hmacfs keeps the file of a GET URL: storage / decoded path below the prefix."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(get_url).path)
        assert path.startswith(self.hmacfs.prefix), (get_url, self.hmacfs.prefix)
        return self.hmacfs.storage / path[len(self.hmacfs.prefix):]

    def explain(self, what: str, reply: Optional[httpraw.Reply] = None, slot: Optional[Slot] = None) -> str:
        """A failure message with the slot as the peer sent it and both logs' tails."""
        lines = [f"[{self.name}] {what}"]
        if slot is not None:
            lines += [f"  PUT {slot.put_url}", f"  headers {slot.headers}", f"  GET {slot.get_url}"]
        if reply is not None:
            lines.append(f"  -> {reply.status} {dict(reply.headers)} {reply.body[:300]!r}")
        lines += ["--- hmacfs log ---", self.hmacfs.log()[-4000:],
                  "--- peer log ---", self.peer_log()[-3000:]]
        return "\n".join(lines)


def put(slot: Slot, body: bytes, content_type: str = "image/png",
        length: Optional[int] = None) -> httpraw.Reply:
    """PUT the slot URL byte for byte with exactly the slot's headers (plus type and length)."""
    headers = {"Content-Type": content_type, **slot.headers}
    if length is not None:
        headers["Content-Length"] = str(length)
    return httpraw.request("PUT", slot.put_url, body, headers)


def get_slot(setup: Setup, size: int, name: str = FILE_NAME, content_type: str = "image/png") -> Slot:
    """Log in and request one slot from the setup's upload service."""
    async def scenario() -> Slot:
        async with session(setup.jid, setup.password, setup.xmpp_port) as client:
            return await xmppclient.request_slot(client, setup.service, name, size, content_type)
    return run(scenario())


def get_slots(setup: Setup, names: list[str], size: int, content_type: str) -> list[Slot]:
    """One login, one slot per file name (cheaper than a session each)."""
    async def scenario() -> list[Slot]:
        async with session(setup.jid, setup.password, setup.xmpp_port) as client:
            return [await xmppclient.request_slot(client, setup.service, name, size, content_type)
                    for name in names]
    return run(scenario())


ODD_NAMES = ["a+b c.txt", "100% sure.txt", "q?x=1#frag.txt", "semi;colon=eq&amp.txt", "quote'\"<>.txt",
             "emoji 😀.txt", "nfd-e\u0301.txt", "-dash.txt", "日本語 ファイル.txt", "a%2Fb.txt"]
REFUSED_NAMES = [".hidden.txt", "x" * 252 + ".txt"]  # reserved leading dot; 256 bytes > NAME_MAX


def check_file_names(setup: Setup) -> None:
    """Names clients really send survive the server's escaping; the documented exceptions get 400."""
    slots = get_slots(setup, ODD_NAMES + REFUSED_NAMES, 5, "text/plain")
    for name, slot in zip(ODD_NAMES + REFUSED_NAMES, slots):
        reply = put(slot, b"hello", content_type="text/plain")
        if name in REFUSED_NAMES:
            assert reply.status == 400, setup.explain(f"PUT for {name!r}", reply, slot)
            continue
        assert reply.status == 201, setup.explain(f"PUT for {name!r}", reply, slot)
        got = httpraw.request("GET", slot.get_url)
        assert got.status == 200 and got.body == b"hello", setup.explain(f"GET for {name!r}", got, slot)
        assert setup.stored(slot.get_url).read_bytes() == b"hello"


def check_discovery(setup: Setup) -> None:
    """disco#items lists the upload service; disco#info shows store/file and max-file-size."""
    async def scenario() -> tuple[list[str], xmppclient.Service, xmppclient.Service]:
        async with session(setup.jid, setup.password, setup.xmpp_port) as client:
            items = await xmppclient.disco_items(client, DOMAIN)
            found = await xmppclient.find_service(client)
            described = await xmppclient.describe(client, setup.service)
            return items, found, described
    items, found, described = run(scenario())
    assert setup.service in items, setup.explain(f"disco#items of {DOMAIN}: {items}")
    assert found.jid == setup.service, setup.explain(f"slixmpp discovered {found}")
    assert described.max_file_size == LIMIT, setup.explain(f"advertised {described}")


def check_slixmpp_upload(setup: Setup) -> None:
    """slixmpp's own upload_file (aiohttp) uploads; the GET URL serves the same bytes and type."""
    async def scenario() -> str:
        async with session(setup.jid, setup.password, setup.xmpp_port) as client:
            uploader = xmppclient.plugin(client, "xep_0363")
            return await uploader.upload_file(FILE_NAME, size=len(PAYLOAD), content_type="image/png",
                                              input_file=io.BytesIO(PAYLOAD), timeout=10)
    try:
        get_url = run(scenario())
    except Exception as err:
        raise AssertionError(setup.explain(f"slixmpp upload_file failed: {err!r}")) from err
    reply = httpraw.request("GET", get_url)
    assert reply.status == 200 and reply.body == PAYLOAD, setup.explain(f"GET {get_url}", reply)
    assert reply.headers["Content-Type"] == "image/png", setup.explain("type served back", reply)
    assert setup.stored(get_url).read_bytes() == PAYLOAD


def check_raw_put(setup: Setup) -> None:
    """The slot URL PUT byte for byte (Prosody: lowercase escapes) gets 201; GET returns the bytes."""
    slot = get_slot(setup, len(PAYLOAD))
    if setup.lowercase_escapes:
        assert "%c3%a4" in slot.put_url and "%28" in slot.put_url, slot  # the case this test exists for
    reply = put(slot, PAYLOAD)
    assert reply.status == 201, setup.explain("PUT of the slot URL", reply, slot)
    got = httpraw.request("GET", slot.get_url)
    assert got.status == 200 and got.body == PAYLOAD, setup.explain("GET after PUT", got, slot)
    assert setup.stored(slot.get_url).read_bytes() == PAYLOAD
    again = put(slot, PAYLOAD)
    assert again.status == 409, setup.explain("second PUT to a used slot", again, slot)
    assert setup.stored(slot.get_url).read_bytes() == PAYLOAD


def self_signed(setup: Setup, size: int, content_type: str = "image/png", exp_in: int = 300) -> Slot:
    """A slot signed with the shared secret exactly as the setup's XMPP server would sign it."""
    base, secret = setup.hmacfs.upload_base, setup.hmacfs.secret
    if setup.protocol == "jwt":
        slot_id = secrets.token_urlsafe(18)
        now = int(time.time())
        token = httpraw.jwt_hs256(secret, {
            "sub": setup.jid, "iat": now, "exp": now + exp_in, "slot": slot_id, "expires": now + 3600,
            "filename": FILE_NAME, "filesize": size, "filetype": content_type})
        url = f"{base}{slot_id}/{urllib.parse.quote(FILE_NAME)}"
        return Slot(url, url, {"Authorization": f"Bearer {token}"})
    random_part = str(uuid.uuid4())
    path = f"{random_part}/{FILE_NAME}"
    get_url = f"{base}{random_part}/{httpraw.prosody_quote(FILE_NAME)}"
    if setup.protocol == "v":
        query = "v=" + httpraw.mac(secret, f"{path} {size}")
    else:
        query = "v2=" + httpraw.mac(secret, f"{path}\0{size}\0{content_type}")
    return Slot(f"{get_url}?{query}", get_url)


def check_over_limit(setup: Setup) -> None:
    """Over max-file-size: the client refuses from disco, the server refuses the slot, hmacfs 413s."""
    async def client_side() -> Optional[FileTooBig]:
        async with session(setup.jid, setup.password, setup.xmpp_port) as client:
            uploader = xmppclient.plugin(client, "xep_0363")
            try:
                await uploader.upload_file(FILE_NAME, size=LIMIT + 1, content_type="image/png",
                                           input_file=io.BytesIO(b"x" * (LIMIT + 1)), timeout=10)
            except FileTooBig as err:
                return err
            return None
    refusal = run(client_side())
    assert isinstance(refusal, FileTooBig), setup.explain("slixmpp did not refuse from the advertised limit")

    if setup.refuses_over_limit:
        async def server_side() -> Exception:
            async with session(setup.jid, setup.password, setup.xmpp_port) as client:
                return await xmppclient.refused_slot(client, setup.service, FILE_NAME, LIMIT + 1, "image/png")
        err = run(server_side())
        assert err.condition == "not-acceptable", err.iq
        assert err.iq.xml.find(".//{urn:xmpp:http:upload:0}file-too-large") is not None, err.iq

    slot = self_signed(setup, LIMIT + 1)
    reply = put(slot, b"x" * (LIMIT + 1))
    assert reply.status == 413, setup.explain("over-limit PUT signed like the peer", reply, slot)
    assert not setup.stored(slot.get_url).exists()
    fits = self_signed(setup, LIMIT)
    reply = put(fits, b"y" * LIMIT)
    assert reply.status == 201, setup.explain("PUT of exactly the limit", reply, fits)


def check_wrong_size(setup: Setup) -> None:
    """A PUT whose body is shorter or longer than the slot's size fails and stores nothing."""
    slot = get_slot(setup, len(PAYLOAD))
    for body in (PAYLOAD[:-1], PAYLOAD + b"!"):
        reply = put(slot, body)
        assert 400 <= reply.status < 500, setup.explain(f"PUT of {len(body)} bytes on a "
                                                        f"{len(PAYLOAD)}-byte slot", reply, slot)
        assert not setup.stored(slot.get_url).exists(), setup.explain("stored after refusal", reply, slot)
        assert httpraw.request("GET", slot.get_url).status == 404
    reply = put(slot, PAYLOAD)
    assert reply.status == 201, setup.explain("correct PUT after refused ones", reply, slot)
