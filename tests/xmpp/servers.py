"""Prosody and ejabberd as the tests run them: loopback only, temp dirs, plaintext auth.

The global part of each config is test scaffolding (ports, paths, no TLS); the upload
part is appended verbatim from the docs (see docsnippets), which is what is under test.
Settings that were needed here are explained in shared/docs/testing-notes.md.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Optional

from tests.support.hmacfs_proc import free_port

from .procs import port_open, stop_tree, tail, wait_until

DOMAIN = "localhost"
USERS = {"alice": "alice-pw-363"}


def lua_str(text: str) -> str:
    """A Lua double-quoted string literal (JSON escapes are valid Lua for our paths)."""
    return json.dumps(text)


class Prosody:
    """One Prosody 0.12 process with its own config, data dir and debug log."""

    def __init__(self, workdir: Path, components: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "prosody.cfg.lua"
        self.log_path = workdir / "prosody.log"
        self.components = components
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> str:
        w = self.workdir
        return f"""-- test scaffolding: loopback only, no TLS, no s2s, runs as root in a temp dir
run_as_root = true
pidfile = {lua_str(str(w / "prosody.pid"))}
data_path = {lua_str(str(w / "data"))}
certificates = {lua_str(str(w / "certs"))}
log = {{ debug = {lua_str(str(self.log_path))} }}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_disabled = {{ "s2s" }}
modules_enabled = {{ "roster", "saslauth", "disco", "ping", "posix" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"

VirtualHost {lua_str(DOMAIN)}

-- from the docs:
{self.components}
"""

    def log(self) -> str:
        return tail(self.log_path)

    def start(self, timeout: float = 30.0) -> Prosody:
        for sub in ("data", "certs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        for user, password in USERS.items():
            subprocess.run(["prosodyctl", "--config", str(self.config_path), "register", user, DOMAIN,
                            password], check=True, timeout=30, capture_output=True)
        with open(self.workdir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(["prosody", "-F", "--config", str(self.config_path)],
                                         cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(lambda: port_open(self.port), self.proc, timeout, "prosody",
                   lambda: tail(self.workdir / "stdout.log") + self.log())
        return self

    def stop(self) -> None:
        stop_tree(self.proc)


def ejabberd_libs() -> str:
    """The ERL_LIBS dir holding Debian's ejabberd-<version> (multiarch path), or '' if none."""
    found = sorted(glob.glob("/usr/lib/*/ejabberd-*/ebin/ejabberd.app"))
    return str(Path(found[-1]).parents[2]) if found else ""


class Ejabberd:
    """One ejabberd 23.01 node run with `erl` directly (no ejabberdctl, no epmd, no -sname)."""

    def __init__(self, workdir: Path, modules: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.api_port = free_port()
        self.config_path = workdir / "ejabberd.yml"
        self.log_path = workdir / "log" / "ejabberd.log"
        self.modules = modules
        self.proc: Optional[subprocess.Popen] = None

    def config(self) -> str:
        return f"""# test scaffolding: loopback only, no TLS, mod_http_api to register users
hosts:
  - {DOMAIN}
loglevel: debug
certfiles: []
acme:
  auto: false
listen:
  -
    port: {self.port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: false
  -
    port: {self.api_port}
    ip: "127.0.0.1"
    module: ejabberd_http
    request_handlers:
      /api: mod_http_api
acl:
  local:
    user_regexp: ""
  loopback:
    ip:
      - 127.0.0.0/8
access_rules:
  local:
    allow: local
api_permissions:
  "loopback may register":
    from:
      - mod_http_api
    who:
      ip: 127.0.0.0/8
    what:
      - register
# from the docs:
{self.modules}  mod_disco: {{}}
  mod_http_api: {{}}
  mod_roster: {{}}
"""

    def log(self) -> str:
        return tail(self.log_path)

    def start(self, timeout: float = 60.0) -> Ejabberd:
        w = self.workdir
        for sub in ("spool", "log", "home", "contrib"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        env = dict(os.environ, EJABBERD_CONFIG_PATH=str(self.config_path),
                   EJABBERD_LOG_PATH=str(self.log_path),
                   EJABBERD_PID_PATH=str(w / "ejabberd.pid"), HOME=str(w / "home"),
                   CONTRIB_MODULES_PATH=str(w / "contrib"), ERL_LIBS=ejabberd_libs())
        with open(w / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["erl", "-noinput", "-noshell", "+K", "true", "-mnesia", "dir", json.dumps(str(w / "spool")),
                 "-s", "ejabberd"],
                cwd=w, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: port_open(self.api_port) and port_open(self.port), self.proc, timeout,
                   "ejabberd", lambda: tail(w / "stdout.log") + self.log())
        for user, password in USERS.items():
            self.register(user, password)
        return self

    def register(self, user: str, password: str) -> None:
        """Create an account through mod_http_api (ejabberdctl would need epmd and a user switch)."""
        body = json.dumps({"user": user, "host": DOMAIN, "password": password}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/api/register", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200, resp.read()

    def stop(self) -> None:
        stop_tree(self.proc, timeout=15)
