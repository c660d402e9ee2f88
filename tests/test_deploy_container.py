"""deploy/ as a container runtime runs it: the image's ENTRYPOINT as PID 1 of its own PID namespace, stopped with
SIGTERM from outside it as Docker and the kubelet stop a container."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
POLICY = """version: 1
models:
  small: {endpoint: "http://127.0.0.1:9/v1", size_b: 1, price: {input_per_mtok: 1, output_per_mtok: 1}}
routes:
  - {name: default, match: {models: [auto]}, candidates: [small]}
server: {grace_period_s: 1}
"""


def dockerfile_instruction(name: str) -> list[str]:
    """The exec-form argv of the runtime stage's last `name` instruction (ENTRYPOINT, CMD)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(f"{name} ")]
    return json.loads(lines[-1][len(name) + 1:])


def can_be_pid1() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "true"],
                          capture_output=True).returncode == 0


def pid1_of(launcher: subprocess.Popen, argv0: str, deadline_s: float = 5.0) -> int:
    """The host pid of the launcher's child (PID 1 in its namespace), once it has exec'd `argv0`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
            if children and argv0 in Path(f"/proc/{children[0]}/cmdline").read_bytes().decode(errors="replace"):
                return int(children[0])
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError("the container's PID 1 never started")


def wait_until_catching(pid: int, signum: int, deadline_s: float = 5.0) -> None:
    """Wait until process `pid` has a handler for `signum` (its SigCgt mask in /proc)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signum - 1)):
            return
        time.sleep(0.002)
    raise AssertionError(f"process {pid} never caught signal {signum}")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not can_be_pid1(), reason="needs unprivileged user and PID namespaces (unshare)")
def test_image_entrypoint_stops_on_a_sigterm_sent_while_the_gateway_starts(tmp_path):
    """`docker stop` / a pod deleted during start-up (a rollout replaced, a scale-down): the SIGTERM must stop the
    container, not be dropped by a PID 1 that has no handler yet, leaving it to serve on until the SIGKILL."""
    entrypoint = dockerfile_instruction("ENTRYPOINT")
    resolved = [shutil.which(entrypoint[0]) or pytest.skip(f"{entrypoint[0]} is not installed here"),
                *[shutil.which(arg) or arg if arg in ("gateway",) else arg for arg in entrypoint[1:]]]
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [*resolved, "run", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_PROMETHEUS": "0"}
    env.pop("GATEWAY_REDIS_URL", None)
    launcher = subprocess.Popen(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", *argv],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pid1 = pid1_of(launcher, Path(resolved[0]).name)
        # once the interpreter runs the gateway's own code (a few tens of ms after exec; before that no process
        # can have a handler), until it serves
        wait_until_catching(pid1, signal.SIGTERM)
        assert not listening(port), "the gateway was already serving: the SIGTERM would not fall in its start-up"
        os.kill(pid1, signal.SIGTERM)
        try:
            assert launcher.wait(timeout=4) == 0, launcher.stderr.read().decode(errors="replace")[-2000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the container ignored the SIGTERM sent during start-up (serving: {listening(port)}); "
                        f"Docker/the kubelet would SIGKILL it only after the whole grace period")
    finally:
        if launcher.poll() is None:
            launcher.kill()             # --kill-child: its PID 1 dies with it
            launcher.wait()
