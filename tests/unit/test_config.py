"""The configuration contract (shared/spec/config.md), including the seeds' own example configs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hmacfs import config
from hmacfs.errors import ConfigError

SEEDS = Path(__file__).resolve().parents[3] / "shared" / "seeds"
STRONG = "a-long-random-secret-for-tests-0123456789"


def toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, re.S)


def seed_config(name_glob: str, tmp_path: Path) -> str:
    """The seed's main example config with only paths and the secret changed (as the issue allows)."""
    (seed,) = SEEDS.glob(name_glob)
    block = max(toml_blocks(seed.read_text()), key=len)
    block = re.sub(r'"/(path/to|mnt)/[^"]*"', lambda m: f'"{tmp_path}/x"', block)
    block = re.sub(r'(?im)^(\s*secret\s*=\s*)"[^"]*"', rf'\1"{STRONG}"', block)
    return block


def load_text(tmp_path: Path, text: str, **env) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(str(p), environ=env)


@pytest.mark.skipif(not SEEDS.exists(), reason="shared/seeds is not beside the checkout")
def test_seed_000_loads_without_warnings(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, seed_config("000_*", tmp_path))
    assert cfg.warnings == ()
    assert cfg.server.minfreebytes == 5 * 1024**3 and cfg.server.filettl == 2 * 365 * 86400
    assert cfg.deduplication.enabled and cfg.thumbnails.size == "200x200"
    assert cfg.clamav.numscanworkers == 4 and ".exe" in cfg.clamav.scanfileextensions
    assert cfg.redis.redishealthcheckinterval == 120 and cfg.workers.uploadqueuesize == 5000
    assert cfg.listen.port == 8080 and cfg.metrics_listen.port == 9090


@pytest.mark.skipif(not SEEDS.exists(), reason="shared/seeds is not beside the checkout")
def test_seed_003_flat_keys_are_aliases(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, seed_config("003_*", tmp_path))
    assert cfg.warnings == ()
    assert cfg.security.secret == STRONG and cfg.server.storagepath == f"{tmp_path}/x"
    assert cfg.listen.port == 8080 and cfg.server.metricsenabled and not cfg.redis.redisenabled
    assert not cfg.clamav.clamavenabled and cfg.uploads.chunkeduploadsenabled and cfg.server.filettl == 30 * 86400


PLUSONE_3X = f"""
[server]
listen_address = ":8080"
storage_path = "/tmp/x"
metrics_enabled = true
pid_file = "/tmp/x.pid"
max_upload_size = "10GB"
max_header_bytes = 1048576
cleanup_interval = "24h"
max_file_age = "720h"
pre_cache = true
deduplication_enabled = true
min_free_bytes = "1GB"
enable_dynamic_workers = true
[uploads]
allowed_extensions = [".txt", ".png"]
chunked_uploads_enabled = true
chunk_size = "10MB"
max_resumable_age = "48h"
[downloads]
chunk_size = "8192"
[security]
secret = "{STRONG}"
jwtalgorithm = "HS256"
[logging]
level = "debug"
file = "/tmp/x.log"
max_size = 100
max_backups = 7
max_age = 30
compress = true
[network_resilience]
enabled = true
[workers]
num_workers = 4
upload_queue_size = 50
"""


def test_plusone_3x_underscored_keys(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, PLUSONE_3X)
    assert cfg.warnings == ()
    assert cfg.listen.port == 8080 and cfg.server.storagepath == "/tmp/x" and cfg.server.pidfilepath == "/tmp/x.pid"
    assert cfg.uploads.maxuploadsize == 10 * 1024**3 and cfg.server.maxheaderbytes == 1048576
    assert cfg.uploads.resumableexpiry == 48 * 3600 and cfg.server.loglevel == "debug"
    assert cfg.server.logfile == "/tmp/x.log" and cfg.server.logbackups == 7
    assert cfg.workers.uploadqueuesize == 50 and cfg.server.precaching
    assert any("network_resilience" in n for n in cfg.notes)


def test_unknown_key_warns_with_suggestion_and_strict_is_fatal(tmp_path: Path) -> None:
    text = f'[server]\nlistenprot = "8080"\n[security]\nsecret = "{STRONG}"\n[uplods]\nx = 1\n'
    cfg = load_text(tmp_path, text)
    assert any("listenprot" in w and "listenport" in w for w in cfg.warnings)
    assert any("[uplods]" in w and "uploads" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="listenprot"):
        load_text(tmp_path, text.replace("[server]\n", "[server]\nstrictconfig = true\n"))


@pytest.mark.parametrize("text, fragment", [
    ('[uploads]\nmaxuploadsize = "5XB"', "maxuploadsize"),
    ('[timeouts]\nreadtimeout = "soon"', "readtimeout"),
    ('[server]\nlistenport = "host:port"', "listenport"),
    ('[server]\nloglevel = "loud"', "loglevel"),
    ('[server]\ntrustedproxies = ["10.0.0.0/33"]', "trustedproxies"),
    ('[server]\nstoredir = "a"\nstoragepath = "b"', "different value"),
    ('[uploads]\nchunksize = "0"', "chunksize"),
    ('[uploads]\nresumableexpiry = "0s"', "resumableexpiry"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_text(tmp_path, f'{text}\n[security]\nsecret = "{STRONG}"\n' if "[security]" not in text else text)


def test_secret_sources_and_placeholder_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret is empty"):
        load_text(tmp_path, '[server]\nlistenport = "127.0.0.1:1"\n')
    assert load_text(tmp_path, '[server]\nlistenport="127.0.0.1:1"\n', HMACFS_SECRET="envsecret").secrets == (
        b"envsecret",)
    (tmp_path / "s").write_text("filesecret\n")
    cfg = load_text(tmp_path, f'[security]\nsecretfile = "{tmp_path}/s"\nprevioussecrets = ["old"]\n')
    assert cfg.secrets == (b"filesecret", b"old") and cfg.jwt_secrets == cfg.secrets
    placeholder = '[security]\nsecret = "change-me-to-a-long-random-string"\n'
    assert load_text(tmp_path, '[server]\nlistenport = "127.0.0.1:8080"\n' + placeholder)
    with pytest.raises(ConfigError, match="placeholder"):
        load_text(tmp_path, '[server]\nlistenport = "8080"\n' + placeholder)


def test_listen_forms() -> None:
    assert config.parse_listen("8080") == config.ListenAddress("", 8080)
    assert config.parse_listen(":8080") == config.ListenAddress("", 8080)
    assert config.parse_listen("127.0.0.1:80") == config.ListenAddress("127.0.0.1", 80)
    assert config.parse_listen("[::1]:80").host == "::1"
    assert config.parse_listen("8080", "127.0.0.2").is_loopback
    for bad in ("99999", "::1:80", "[::1]80", "nothost:80"):
        with pytest.raises(ValueError):
            config.parse_listen(bad)


def test_prefix_normalisation_and_masked_rendering(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, f'uploadsubdir = "files"\n[security]\nsecret = "{STRONG}"\njwtsecret = "j"\n')
    assert cfg.urlprefix == "/files/" and cfg.jwt_secrets == (b"j",)
    text = config.render_effective(cfg)
    assert STRONG not in text and '"********"' in text and 'urlprefix = "files"' in text


def test_shipped_config_loads_cleanly() -> None:
    cfg = config.load(str(Path(__file__).resolve().parents[2] / "config.toml"), environ={})
    assert cfg.warnings == () and cfg.listen.is_loopback and cfg.server.storagepath == "./data"


def test_every_capability_is_implemented_so_none_is_reported_pending(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, f'[redis]\nredisenabled = true\n[storage]\nbackend = "s3"\n'
                    f's3endpoint = "http://127.0.0.1:9000"\ns3bucket = "b"\n[security]\nsecret = "{STRONG}"\n')
    assert cfg.pending == () and config.NOT_YET_IMPLEMENTED == {}
    for section in ("thumbnails", "iso"):
        on = load_text(tmp_path, f'[{section}]\nenabled = true\n[security]\nsecret = "{STRONG}"\n')
        assert on.pending == (), section


@pytest.mark.parametrize("size", ["200", "0x10", "10x", "axb", "5000x10", "-1x5"])
def test_thumbnail_size_is_validated(tmp_path: Path, size: str) -> None:
    with pytest.raises(config.ConfigError, match=r"\[thumbnails\] size"):
        load_text(tmp_path, f'[thumbnails]\nsize = "{size}"\n[security]\nsecret = "{STRONG}"\n')
    assert load_text(tmp_path, f'[security]\nsecret = "{STRONG}"\n').pending == ()


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    missing = [f"[{k.section}] {k.name}" for k in config.SCHEMA
               if not k.compat and f"`{k.name}`" not in reference]
    assert missing == []


@pytest.mark.parametrize(("text", "message"), [
    ('[storage]\nbackend = "s3"\ns3bucket = "b"\n', r"s3endpoint = '': a URL with http"),
    ('[storage]\nbackend = "s3"\ns3endpoint = "127.0.0.1:9000"\ns3bucket = "b"\n', r"s3endpoint = '127.0.0.1:9000'"),
    ('[storage]\nbackend = "s3"\ns3endpoint = "http://h"\n', r"s3bucket: required"),
    ('[storage]\ns3addressing = "dns"\n', r"s3addressing = 'dns'"),
    ('[storage]\nbackend = "s3"\ns3endpoint = "http://h"\ns3bucket = "b"\ns3partconcurrency = 0\n',
     r"s3partconcurrency = 0"),
    ('[storage]\nbackend = "s3"\ns3endpoint = "http://h"\ns3bucket = "b"\n[uploads]\nchunksize = "1MB"\n',
     r"chunksize: the S3 backend's part size"),
    ('[storage]\nbackend = "gcs"\n', r"backend = 'gcs': expected local or s3"),
    ('[redis]\nredisenabled = true\nredisaddr = "localhost"\n', r"redisaddr = 'localhost': expected host:port"),
    ('[redis]\nredisenabled = true\nredisaddr = "h:99999"\n', r"port '99999'"),
    ('[redis]\nredisenabled = true\nredisaddr = "http://h:1"\n', r"scheme 'http'"),
    ('[redis]\nredisenabled = true\nredisdbindex = -1\n', r"db index -1"),
])
def test_cluster_settings_are_validated_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        load_text(tmp_path, text + f'[security]\nsecret = "{STRONG}"\n')


def test_redis_addresses_parse_to_client_options() -> None:
    from hmacfs.services.redisconn import parse_redis_address as parse

    assert parse("127.0.0.1:6380", 2) == {"host": "127.0.0.1", "port": 6380, "db": 2}
    assert parse("[::1]:6379") == {"host": "::1", "port": 6379, "db": 0}
    assert parse("unix:/run/redis/redis.sock", 1) == {"unix_socket_path": "/run/redis/redis.sock", "db": 1}
    assert parse("redis://:p%40ss@r.example:7000/3", 0) == {"host": "r.example", "port": 7000, "db": 3,
                                                            "password": "p@ss"}
    assert parse("rediss://u:pw@r.example") == {"host": "r.example", "port": 6379, "db": 0, "password": "pw",
                                                "username": "u", "ssl": True, "ssl_cert_reqs": "required"}


def test_a_password_in_redisaddr_becomes_the_masked_redispassword(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, f'[redis]\nredisenabled = true\nredisaddr = "rediss://app:s%40cret@r.example:6380/2"\n'
                    f'[security]\nsecret = "{STRONG}"\n')
    assert cfg.redis.redisaddr == "rediss://app@r.example:6380/2" and cfg.redis.redispassword == "s@cret"
    shown = config.render_effective(cfg)
    assert "s@cret" not in shown and "s%40cret" not in shown and 'redispassword = "********"' in shown
    with pytest.raises(config.ConfigError, match="give it once") as caught:
        load_text(tmp_path, f'[redis]\nredisaddr = "redis://:one@h:1"\nredispassword = "two"\n'
                  f'[security]\nsecret = "{STRONG}"\n')
    assert "one" not in str(caught.value).replace("give it once", "")


def test_redis_enabled_without_redis_py_is_a_clear_start_up_error() -> None:
    """Run where `import redis` fails, as on a host with only the standard library."""
    code = ("import sys; sys.modules['redis'] = None\n"
            "from hmacfs.errors import StartupError\n"
            "from hmacfs.services.redisconn import connect\n"
            "try:\n    connect('127.0.0.1:6379', 0)\nexcept StartupError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert "needs the redis package" in done.stdout and "pip install redis" in done.stdout, done
