"""The guard's pure parts: token buckets, failure counting, ban keys, bans over a fake store,
the order of the checks, the fail2ban line and the config rules of [security]."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pytest

from hmacfs import config
from hmacfs.errors import ConfigError, HTTPError
from hmacfs.meta.record import BanRecord
from hmacfs.policy import bans as bans_mod
from hmacfs.policy.bans import Bans, FailureCounter, ban_key
from hmacfs.policy.guard import Guard, GuardSettings, is_auth_failure, mark_auth_failure, networks
from hmacfs.policy.ratelimit import TokenBuckets
from hmacfs.services.logs import LineFormatter, auth_failure_message
from hmacfs.services.metrics import ServerMetrics

# --- token buckets ------------------------------------------------------------------------------


def test_a_bucket_allows_a_minute_in_one_burst_then_refills_at_the_rate() -> None:
    b = TokenBuckets(6)  # 6 per minute: one token per 10 s
    assert [b.take("a", 100.0) for _ in range(6)] == [0.0] * 6
    assert b.take("a", 100.0) == pytest.approx(10.0)
    assert b.take("a", 105.0) == pytest.approx(5.0)  # a refused request takes nothing
    assert b.take("a", 110.0) == 0.0
    assert b.take("a", 110.0) == pytest.approx(10.0)
    assert b.take("b", 110.0) == 0.0  # every key has its own bucket


def test_a_bucket_never_holds_more_than_a_minute() -> None:
    b = TokenBuckets(3)
    assert b.take("a", 0.0) == 0.0
    assert [b.take("a", 10_000.0) for _ in range(4)][-1] > 0  # idle for hours: still 3, not thousands


def test_idle_buckets_are_dropped_and_the_table_is_capped() -> None:
    b = TokenBuckets(60, max_keys=100)
    for i in range(50):
        b.take(f"k{i}", 0.0)
    assert len(b) == 50
    b.take("late", 61.0)  # the 50 are full again after 60 s: the same as absent
    assert len(b) == 1
    for i in range(500):
        b.take(f"flood{i}", 62.0)
    assert len(b) <= 100  # a flood of distinct keys cannot grow it past the cap


# --- failure counting and ban keys ------------------------------------------------------------


def test_failures_ban_only_when_threshold_falls_within_the_window() -> None:
    f = FailureCounter(threshold=3, window=60.0)
    assert [f.add("a", t) for t in (0.0, 30.0)] == [False, False]
    assert f.add("a", 61.0) is False  # 0 .. 61: three, but not within 60 s
    assert f.add("a", 70.0) is True   # 30, 61, 70
    assert f.add("a", 71.0) is False  # the count restarts after a ban
    assert f.add("b", 71.0) is False


def test_failure_counts_are_bounded() -> None:
    f = FailureCounter(threshold=5, window=10.0, max_keys=50)
    for i in range(1000):
        f.add(f"k{i}", float(i) / 1000)
    assert len(f) <= 50
    f.add("late", 100.0)  # everything older than the window goes
    assert len(f) == 1
    assert FailureCounter(threshold=10, window=1.0).max_keys == bans_mod.MAX_TIMES // 10
    assert FailureCounter(threshold=10_000, window=1.0).max_keys == 1000  # memory bounded by times in all


@pytest.mark.parametrize("text, key", [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),       # IPv4-mapped counts as its IPv4 form
    ("203.0.113.7/32", "203.0.113.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),  # IPv6 per /64
    ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1/128", "2001:db8:1:2::/64"),
])
def test_ban_keys(text: str, key: str) -> None:
    assert ban_key(text) == key


@pytest.mark.parametrize("text", ["unix", "203.0.113.0/24", "2001:db8::/48", "", "1.2.3.4.5"])
def test_ban_keys_refuse_what_is_not_one_ban(text: str) -> None:
    with pytest.raises(ValueError):
        ban_key(text)


# --- bans over a fake store -----------------------------------------------------------------------


class FakeStore:
    """The BanStore protocol in a dict; `broken` makes every call fail like a full disk."""

    def __init__(self) -> None:
        self.rows: dict[str, BanRecord] = {}
        self.broken = False
        self.gets = 0

    def _check(self) -> None:
        if self.broken:
            raise OSError("disk full")

    def ban_put(self, ban: BanRecord) -> None:
        self._check()
        self.rows[ban.address] = ban

    def ban_get(self, address: str) -> Optional[BanRecord]:
        self._check()
        self.gets += 1
        return self.rows.get(address)

    def ban_remove(self, address: str) -> bool:
        return self.rows.pop(address, None) is not None

    def bans_active(self, now: float) -> list[BanRecord]:
        self._check()
        return [b for b in self.rows.values() if b.until > now]

    def bans_purge(self, now: float) -> int:
        self._check()
        gone = [a for a, b in self.rows.items() if b.until <= now]
        for a in gone:
            del self.rows[a]
        return len(gone)


def test_a_ban_is_stored_and_ends_after_its_duration() -> None:
    store = FakeStore()
    bans = Bans(store, threshold=2, window=60.0, duration=100.0)
    assert bans.failed("a", 1000.0) is None
    ban = bans.failed("a", 1001.0, "403 signature mismatch")
    assert ban == BanRecord("a", 1101.0, 1001.0, 2, "403 signature mismatch")
    assert store.rows["a"] == ban
    assert bans.banned("a", 1050.0) and not bans.banned("b", 1050.0)
    assert not bans.banned("a", 1101.0)


def test_bans_come_back_from_the_store_and_follow_its_removals(monkeypatch) -> None:
    store = FakeStore()
    store.rows["a"] = BanRecord("a", 2000.0, 900.0, 10)
    store.rows["old"] = BanRecord("old", 950.0, 900.0, 10)
    bans = Bans(store, threshold=10, window=60.0, duration=100.0)
    assert bans.load(1000.0) == 1 and "old" not in store.rows  # ended ones are purged
    assert bans.banned("a", 1000.5) and store.gets == 0  # fresh from the store: no lookup
    assert bans.banned("a", 1002.0) and store.gets == 1  # confirmed once it is stale
    assert bans.banned("a", 1002.5) and store.gets == 1  # at most once per CONFIRM_SECONDS
    store.ban_remove("a")  # `hmacfs bans remove a` beside the server
    assert not bans.banned("a", 1002.5 + bans_mod.CONFIRM_SECONDS)
    assert bans.active() == 0


def test_a_store_that_fails_keeps_the_ban_in_memory(caplog) -> None:
    store = FakeStore()
    bans = Bans(store, threshold=1, window=60.0, duration=100.0)
    store.broken = True
    with caplog.at_level(logging.ERROR, logger="hmacfs"):
        assert bans.failed("a", 10.0) is not None
        assert bans.banned("a", 20.0)  # cannot confirm: keeps refusing
    assert "could not store the ban of a" in caplog.text


# --- the guard ---------------------------------------------------------------------------------


def guard(store: Optional[FakeStore] = None, **settings) -> tuple[Guard, ServerMetrics]:
    for name in ("allow", "deny", "exempt"):
        if name in settings:
            settings[name] = networks(settings[name])
    metrics = ServerMetrics()
    return Guard(GuardSettings(**settings), store or FakeStore(), metrics), metrics


def refusal(g: Guard, client: str, service: bool = False) -> Optional[int]:
    try:
        g.admit(client, service)
    except HTTPError as e:
        return e.status
    return None


def test_nothing_configured_lets_everyone_through() -> None:
    g, _ = guard()
    assert not g.active
    assert refusal(g, "203.0.113.7") is None


def test_denyips_and_allowips_over_ipv4_ipv6_and_mapped_addresses() -> None:
    g, m = guard(deny=["203.0.113.0/24", "2001:db8:bad::/48"])
    assert refusal(g, "203.0.113.9") == 403
    assert refusal(g, "::ffff:203.0.113.9") == 403  # IPv4-mapped is its IPv4 form
    assert refusal(g, "2001:db8:bad:1::5") == 403
    assert refusal(g, "2001:db8:900d::5") is None
    assert refusal(g, "198.51.100.1") is None
    assert m.denied_requests.value("deny") == 3
    g, m = guard(allow=["198.51.100.0/24", "2001:db8::/32"], deny=["198.51.100.66"])
    assert refusal(g, "198.51.100.1") is None and refusal(g, "2001:db8::1") is None
    assert refusal(g, "198.51.100.66") == 403  # deny wins over allow
    assert refusal(g, "203.0.113.1") == 403 and refusal(g, "::1") == 403
    assert (m.denied_requests.value("deny"), m.denied_requests.value("allow")) == (1, 2)


def test_lists_come_before_bans_and_bans_before_the_rate_limit() -> None:
    store = FakeStore()
    now = 1e12  # far future: the stored ban holds
    store.rows["198.51.100.1"] = BanRecord("198.51.100.1", now, 0.0, 3)
    g, m = guard(store, deny=["198.51.100.1"], ban_threshold=3, per_minute=1)
    assert refusal(g, "198.51.100.1") == 403
    assert (m.denied_requests.value("deny"), m.banned_requests.value()) == (1, 0)
    g, m = guard(store, ban_threshold=3, per_minute=1)
    assert refusal(g, "198.51.100.1") == 403 and m.banned_requests.value() == 1
    assert g.by_address is not None and len(g.by_address) == 0  # a banned client spends no token
    assert refusal(g, "198.51.100.2") is None
    assert refusal(g, "198.51.100.2") == 429 and m.ratelimited.value("address") == 1


def test_the_rate_limit_counts_an_ipv6_client_by_its_64_and_spares_services_and_exemptions() -> None:
    g, _ = guard(per_minute=2, exempt=["192.0.2.0/24"])
    assert [refusal(g, "2001:db8::1"), refusal(g, "2001:db8::2")] == [None, None]
    assert refusal(g, "2001:db8::ffff") == 429  # the same /64
    assert refusal(g, "2001:db8:0:1::1") is None  # the next /64
    assert refusal(g, "2001:db8::1", service=True) is None  # /health, /metrics: no token
    assert [refusal(g, "192.0.2.7") for _ in range(10)] == [None] * 10
    try:
        g.admit("2001:db8::1")
    except HTTPError as e:
        assert e.status == 429 and 1 <= int(e.headers["Retry-After"]) <= 30
    else:
        pytest.fail("expected 429")


def test_a_client_without_an_ip_address_is_not_judged() -> None:
    g, _ = guard(allow=["192.0.2.0/24"], per_minute=1, ban_threshold=1)
    assert [refusal(g, "unix") for _ in range(3)] == [None] * 3
    g.auth_failed("unix", "PUT", b"/upload/x", HTTPError(403, "signature mismatch"))
    assert g.bans is not None and g.bans.active() == 0


def test_the_uploader_bucket_is_charged_apart_from_the_address() -> None:
    g, m = guard(per_minute=2, exempt=["192.0.2.0/24"])
    g.charge_uploader("alice", "198.51.100.1")
    g.charge_uploader("alice", "198.51.100.2")
    with pytest.raises(HTTPError) as e:
        g.charge_uploader("alice", "198.51.100.3")  # a fresh address, the same account
    assert e.value.status == 429 and "Retry-After" in e.value.headers
    g.charge_uploader("bob", "198.51.100.3")
    g.charge_uploader(None, "198.51.100.3")  # no JWT: nothing to charge
    g.charge_uploader("alice", "192.0.2.1")  # exempt addresses are exempt here too
    assert m.ratelimited.value("uploader") == 1
    g, _ = guard()  # rate limiting off
    for _ in range(10):
        g.charge_uploader("alice", "198.51.100.1")


def test_auth_failures_log_one_line_each_and_ban_at_the_threshold(caplog) -> None:
    store = FakeStore()
    g, m = guard(store, ban_threshold=2, ban_window=60.0, ban_duration=3600.0)
    with caplog.at_level(logging.WARNING, logger="hmacfs.auth"):
        g.auth_failed("2001:db8::7", "PUT", b"/upload/a/b.png", HTTPError(403, "signature mismatch"))
        assert refusal(g, "2001:db8::7") is None
        g.auth_failed("2001:db8::8", "GET", b"/upload/a/c.png", HTTPError(410, "signed URL has expired"))
    assert refusal(g, "2001:db8::9") == 403  # the /64 is banned
    assert list(store.rows) == ["2001:db8::/64"] and m.bans.value() == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == [
        'auth failure client=2001:db8::7 status=403 method=PUT reason="signature mismatch" path=/upload/a/b.png',
        'auth failure client=2001:db8::8 status=410 method=GET reason="signed URL has expired" path=/upload/a/c.png']
    assert lines[2].startswith("ban client=2001:db8::/64 until=") and len(lines) == 3


def test_reconfiguring_keeps_bans_and_buckets_whose_meaning_stayed() -> None:
    store = FakeStore()
    g, _ = guard(store, per_minute=1, ban_threshold=1)
    g.auth_failed("198.51.100.1", "PUT", b"/upload/x", HTTPError(403, "signature mismatch"))
    assert refusal(g, "198.51.100.2") is None
    g.configure(GuardSettings(deny=networks(["203.0.113.0/24"]), per_minute=1, ban_threshold=1))
    assert refusal(g, "203.0.113.1") == 403  # the new list applies
    assert refusal(g, "198.51.100.1") == 403  # the ban holds
    assert refusal(g, "198.51.100.2") == 429  # its bucket was kept
    g.configure(GuardSettings(per_minute=5, ban_threshold=4))
    assert refusal(g, "198.51.100.2") is None  # a new rate: new buckets
    assert refusal(g, "198.51.100.1") == 403  # new ban rules: bans reloaded from the store
    g.configure(GuardSettings())
    assert not g.active and refusal(g, "198.51.100.1") is None  # banenabled = false: not enforced


def test_the_auth_failure_mark_travels_on_the_error() -> None:
    err = HTTPError(403, "signature mismatch")
    assert not is_auth_failure(err)
    mark_auth_failure(err)
    assert is_auth_failure(err) and not is_auth_failure(HTTPError(403))


# --- the log line ------------------------------------------------------------------------------


def test_the_auth_failure_line_escapes_what_a_client_sent() -> None:
    line = auth_failure_message("198.51.100.1", 401, "PUT", b"/upload/a\nWARNING x/\xff\"q", 'bad "token"')
    assert line == ('auth failure client=198.51.100.1 status=401 method=PUT reason="bad \\"token\\"" '
                    'path=/upload/a\\x0aWARNING x/\\xff"q')
    assert "\n" not in line


def test_a_multi_line_record_cannot_forge_a_line_of_its_own() -> None:
    fmt = LineFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom\nWARNING hmacfs.auth: auth failure client=6.6.6.6 status=403 method=PUT\rX")
    except ValueError:
        import sys

        record = logging.LogRecord("hmacfs", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = fmt.format(record).split("\n")
    assert lines[0] == "ERROR hmacfs: failed" and len(lines) > 3
    assert all(line.startswith("  | ") for line in lines[1:])
    plain = logging.LogRecord("hmacfs", logging.INFO, __file__, 1, "one line", (), None)
    assert fmt.format(plain) == "INFO hmacfs: one line"


# --- config --------------------------------------------------------------------------------------

STRONG = "a-strong-secret-for-tests-0123456789"


def load(tmp_path: Path, security: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(f'[security]\nsecret = "{STRONG}"\n{security}\n')
    return config.load(str(path), environ={})


def test_security_keys_load_and_are_no_longer_reported_as_unimplemented(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'ratelimitingenabled = true\nmaxrequestsperminute = 30\nratelimitexempt = ["10.0.0.0/8"]\n'
                         'banenabled = true\nbanthreshold = 5\nbanwindow = "5m"\nbanduration = "2h"\n'
                         'allowips = ["192.0.2.0/24", "2001:db8::/32"]\ndenyips = ["192.0.2.66"]')
    assert cfg.pending == () and cfg.warnings == ()
    s = GuardSettings.from_config(cfg)
    assert (s.per_minute, s.ban_threshold, s.ban_window, s.ban_duration) == (30, 5, 300.0, 7200.0)
    assert [str(n) for n in s.allow + s.deny + s.exempt] == ["192.0.2.0/24", "2001:db8::/32", "192.0.2.66/32",
                                                            "10.0.0.0/8"]
    off = GuardSettings.from_config(load(tmp_path, "maxrequestsperminute = 0\nbanthreshold = 0"))
    assert (off.per_minute, off.ban_threshold) == (0, 0)  # turned off, an old config's zeros load


@pytest.mark.parametrize("security, message", [
    ('ratelimitexempt = ["10.0.0.300/8"]', "ratelimitexempt: '10.0.0.300/8' is not an address or CIDR"),
    ('denyips = ["nope"]', "denyips: 'nope'"),
    ("ratelimitingenabled = true\nmaxrequestsperminute = 0", "maxrequestsperminute = 0: at least 1"),
    ("banenabled = true\nbanthreshold = 0", "banthreshold = 0: at least 1"),
    ('banenabled = true\nbanwindow = "0s"', "banwindow: more than 0s"),
])
def test_security_keys_are_validated(tmp_path: Path, security: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(tmp_path, security)
