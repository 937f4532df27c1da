"""The metrics listener's access keys: validated at load, the token masked by check-config."""
from __future__ import annotations

import pytest

from hmacfs import config
from hmacfs.errors import ConfigError

STRONG = "a-long-random-secret-for-tests-0123456789"
TOKEN = "scrape-token-0123456789abcdef"


def load(server: dict) -> config.Config:
    return config.from_dict({"server": server, "security": {"secret": STRONG}}, environ={})


def test_defaults_leave_the_metrics_open() -> None:
    cfg = load({})
    assert cfg.server.metricstoken == "" and cfg.server.metricsallowips == []


def test_token_is_masked_by_check_config_and_never_in_errors() -> None:
    cfg = load({"metricstoken": TOKEN, "metricsallowips": ["10.0.0.0/8", "::1"]})
    text = config.render_effective(cfg)
    assert TOKEN not in text and 'metricstoken = "********"' in text
    assert 'metricsallowips = ["10.0.0.0/8", "::1"]' in text
    with pytest.raises(ConfigError) as e:
        load({"metricstoken": "short secret"})
    assert "metricstoken" in str(e.value) and "short secret" not in str(e.value)


@pytest.mark.parametrize("token", ["too-short", "has a space in it 0123456789", "tab\tinside-0123456789abc",
                                   "non-ascii-é-0123456789abcdef"])
def test_unusable_tokens_are_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="metricstoken"):
        load({"metricstoken": token})


def test_allow_list_entries_must_be_cidrs() -> None:
    with pytest.raises(ConfigError, match=r"metricsallowips: 'prometheus\.local'"):
        load({"metricsallowips": ["prometheus.local"]})
