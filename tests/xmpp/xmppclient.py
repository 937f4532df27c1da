"""A real XMPP client session (slixmpp) for the end-to-end tests: log in, disco, request slots.

slixmpp 1.17 refuses SCRAM and PLAIN without TLS unless told otherwise; the servers in
these tests listen on loopback without certificates, so TLS is switched off explicitly.
"""
from __future__ import annotations

import asyncio
import contextlib
import warnings
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Optional, TypeVar

import slixmpp
from slixmpp.exceptions import IqError

T = TypeVar("T")


@dataclass
class Slot:
    """What an upload slot hands the client: PUT URL, its headers, GET URL."""

    put_url: str
    get_url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Service:
    """An upload service found by disco: its JID and advertised max-file-size."""

    jid: str
    max_file_size: Optional[int]


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run one client scenario with a hard deadline (no test waits forever on a stanza)."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def session(jid: str, password: str, port: int,
                  timeout: float = 20.0) -> AsyncIterator[slixmpp.ClientXMPP]:
    """A logged-in client connected to 127.0.0.1:port without TLS; disconnects on exit."""
    client = slixmpp.ClientXMPP(jid, password,
                                plugin_config={"feature_mechanisms": {"unencrypted_scram": True}})
    client.enable_direct_tls = False
    client.enable_starttls = False
    client.enable_plaintext = True
    for plugin in ("xep_0030", "xep_0128", "xep_0363"):
        client.register_plugin(plugin)
    started: asyncio.Future = asyncio.get_running_loop().create_future()

    def fail(reason: str):
        def handler(_event: object) -> None:
            if not started.done():
                started.set_exception(RuntimeError(f"XMPP login as {jid} failed: {reason}"))
        return handler

    client.add_event_handler("session_start", lambda _e: started.done() or started.set_result(True))
    client.add_event_handler("failed_auth", fail("authentication refused"))
    client.add_event_handler("connection_failed", fail("connection failed"))
    client.connect(host="127.0.0.1", port=port)
    try:
        await asyncio.wait_for(started, timeout)
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 5)


def plugin(client: slixmpp.ClientXMPP, name: str):
    """A registered plugin (item access on the client is deprecated in slixmpp 1.17)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return client.plugin[name]


async def disco_items(client: slixmpp.ClientXMPP, domain: str) -> list[str]:
    """JIDs listed by disco#items on the server's domain (where clients look for services)."""
    iq = await plugin(client, "xep_0030").get_items(jid=domain, timeout=10)
    return [str(item[0]) for item in iq["disco_items"]["items"]]


async def describe(client: slixmpp.ClientXMPP, jid: str) -> Service:
    """disco#info of an upload component: identity store/file, the feature, and max-file-size."""
    iq = await plugin(client, "xep_0030").get_info(jid=jid, timeout=10)
    info = iq["disco_info"]
    assert ("store", "file") in {(i[0], i[1]) for i in info["identities"]}, info
    assert "urn:xmpp:http:upload:0" in info["features"], info
    limit = None
    for form in info.iterables:
        values = form["values"]
        if values.get("FORM_TYPE") == ["urn:xmpp:http:upload:0"]:
            limit = int(values["max-file-size"])
    return Service(jid, limit)


async def find_service(client: slixmpp.ClientXMPP) -> Service:
    """Discover the upload service the way slixmpp's own upload_file does."""
    iq = await plugin(client, "xep_0363").find_upload_service(timeout=10)
    assert iq is not None, "no upload service found by disco"
    return await describe(client, str(iq["from"]))


async def request_slot(client: slixmpp.ClientXMPP, service: str, filename: str, size: int,
                       content_type: str) -> Slot:
    """Ask for a XEP-0363 slot; IqError propagates (the server refused)."""
    iq = await plugin(client, "xep_0363").request_slot(service, filename, size, content_type, timeout=10)
    slot = iq["http_upload_slot"]
    headers = {h["name"]: h["value"] for h in slot["put"]["headers"]}
    return Slot(slot["put"]["url"], slot["get"]["url"], headers)


async def refused_slot(client: slixmpp.ClientXMPP, service: str, filename: str, size: int,
                       content_type: str) -> IqError:
    """Request a slot that must be refused; return the error stanza."""
    try:
        slot = await request_slot(client, service, filename, size, content_type)
    except IqError as err:
        return err
    raise AssertionError(f"server handed out a slot it should refuse: {slot}")
