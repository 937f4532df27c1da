"""Time an hmacfs start with no network but loopback, and catch any DNS lookup it makes.

Strategy: this runs INSIDE a bare root filesystem on that root's Python (3.9+, stdlib only),
in a fresh network namespace holding only `lo` (tests/integration/test_any_host.py sets that
up). An air-gapped host has no resolver to answer, so a lookup at start-up shows as a start
that hangs for the resolver's timeout, or worse. The caller points /etc/resolv.conf at
127.0.0.1, where this probe answers nothing but records every query: zero queries is the
claim, not merely "it was quick this time".

    python3 airgap_probe.py PYZ CONFIG PORT  ->  one JSON line: health_s, exit_code, dns_queries
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def _record_dns(sock: socket.socket, seen: list) -> None:
    """Every datagram to port 53 is a lookup attempt: record the queried name, answer nothing."""
    while True:
        try:
            data, _ = sock.recvfrom(4096)
        except OSError:
            return
        name, i = [], 12  # a DNS header is 12 bytes; then length-prefixed labels
        while i < len(data) and data[i]:
            name.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace"))
            i += 1 + data[i]
        seen.append(".".join(name))


def main(pyz: str, config: str, port: int) -> int:
    seen: list = []
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))
    threading.Thread(target=_record_dns, args=(dns, seen), daemon=True).start()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, pyz, "-config", config], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    health_s = None
    while time.monotonic() - started < 20 and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    health_s = time.monotonic() - started
                    break
        except OSError:
            time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    dns.close()
    print(json.dumps({"health_s": health_s, "exit_code": proc.returncode, "dns_queries": seen,
                      "output_tail": out.decode("utf-8", "replace")[-2000:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
