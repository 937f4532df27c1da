#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what it needs (Debian
# packages, a venv with the test packages), then runs ruff and pytest. Safe to re-run:
# it installs only what is missing.
#
#   bash contrib/run-tests.sh            # everything
#   bash contrib/run-tests.sh -k jwt     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests start on loopback (see tests/xmpp, tests/browser, tests/js, bench/).
# npm is not listed: Debian ships it apart from nodejs, but NodeSource's nodejs bundles it and
# conflicts with Debian's npm package, so npm is installed below only if the command is missing.
APT_PACKAGES=(python3 python3-venv prosody prosody-modules ejabberd chromium chromium-driver nginx haproxy openssl curl wrk
              nodejs fail2ban clamav-daemon imagemagick logrotate systemd prometheus genisoimage xorriso debootstrap iproute2 redis-server)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== creating .venv with the test packages"
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
    echo "$want" > "$stamp"
fi

# The JavaScript clients the tests drive (tests/js: tus-js-client), exactly as package-lock.json pins them.
if ! command -v npm >/dev/null; then
    echo "== installing Debian package: npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends npm
fi
js_stamp=tests/js/node_modules/.hmacfs-lock.sha256
js_want=$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)
if [ "$(cat "$js_stamp" 2>/dev/null)" != "$js_want" ]; then
    echo "== installing tests/js packages (npm ci)"
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
    echo "$js_want" > "$js_stamp"
fi

echo "== ruff"
.venv/bin/ruff check .

echo "== pytest"
# HMACFS_REQUIRE_ALL=1: a missing peer program fails the run instead of skipping tests.
export HMACFS_REQUIRE_ALL=1
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
