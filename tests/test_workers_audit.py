"""A gateway process that cannot listen on the socket bound for it says so and fails, whichever event loop
serves it (`gateway run` serves on uvloop)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.test_workers import REPO

#: one gateway process served (as `gateway run` serves it: `_serve_here`, on uvloop) on a socket bound to a port
#: that another socket, bound there too, took first by listening (two starts racing for one port); the process
#: prints its exit status
LISTEN_LOST = """
import socket, sys
from pathlib import Path
from gateway.runtime import PolicyHolder
from gateway.server import _serve_here
first, second = socket.socket(), socket.socket()
for sock in (first, second):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
first.bind(("127.0.0.1", 0))
second.bind(("127.0.0.1", first.getsockname()[1]))
first.listen()
print(_serve_here(PolicyHolder.from_file(Path(sys.argv[1]), {}), "127.0.0.1", [second]), flush=True)
"""


def test_a_gateway_that_loses_the_race_to_listen_exits_1_in_one_line():
    """A port bound by two starts at once is listened on by the first: the second cannot listen, and says so in
    one line and exits 1 (a failure a service manager restarts or reports), not "gateway listening" on a socket
    that takes no connection, then an exit 0 or a gateway serving nothing."""
    try:
        done = subprocess.run([sys.executable, "-c", LISTEN_LOST, "gateway/data/demo.yaml"], cwd=REPO, timeout=20,
                              capture_output=True, text=True, env={**os.environ, "OTEL_SDK_DISABLED": "true"})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("still running 20 s on, serving nothing:\n"
                             + (exc.stderr or b"").decode(errors="replace")) from None
    assert "cannot listen on 127.0.0.1" in done.stderr and "gateway listening" not in done.stderr, done.stderr
    assert done.stdout.split()[-1:] == ["1"], (done.stdout, done.stderr[-2000:])
