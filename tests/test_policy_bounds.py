"""Numbers the policy loader refuses past a limit, because past it the running gateway breaks (a supervisor that
crashes on SIGTERM, a cache that Redis refuses to store) or the setting makes no sense (a circuit open for years):
`gateway policy check` names the key, the limit and its reason, a reload past one keeps the running policy, and the
limit itself still works."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest

from gateway.cli import main
from gateway.ledger import MAX_BACKUPS
from gateway.policy.load import (
    MAX_CACHE_TTL_S, MAX_LATENCY_WINDOW_S, MAX_OPEN_S, MIN_SAMPLE_INTERVAL_S, MIN_TIMEOUT_S, parse_policy,
)
from gateway.routing.pins import MAX_PIN_TTL_S
from gateway.supervisor import MAX_GRACE_PERIOD_S
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.policies import standard_models
from tests.test_workers import POLICY as WORKERS_POLICY, Workers, alive, wait_for

#: a valid policy to which each case appends one section (the route is on line 5)
BASE = """\
version: 1
models:
  small: {endpoint: "http://127.0.0.1:9101/v1"}
routes:
  - name: chat
    candidates: [small]
"""

#: (what is appended to BASE, the key path, the message after "path: ", the value at the limit)
PAST_THE_BOUND = [
    ("server: {grace_period_s: 1e6}\n", "server.grace_period_s",
     "must be at most 86400 (a day; a stop waits up to three grace periods, and --workers cannot wait past about "
     "24 days), got 1000000.0", f"server: {{grace_period_s: {MAX_GRACE_PERIOD_S}}}\n"),
    ("    cache: {enabled: true, ttl_s: 9223372036854775}\n", "routes[0].cache.ttl_s",
     "must be at most 315360000 (ten years; Redis refuses far longer expiries, and stores nothing), "
     "got 9223372036854775", f"    cache: {{enabled: true, ttl_s: {MAX_CACHE_TTL_S}}}\n"),
    ("routing: {latency_window_s: 1e300}\n", "routing.latency_window_s",
     "must be at most 604800 (a week; older samples are no guide), got 1e+300",
     f"routing: {{latency_window_s: {MAX_LATENCY_WINDOW_S}}}\n"),
    ("routing: {breaker: {open_s: 1e300}}\n", "routing.breaker.open_s",
     "must be at most 604800 (a week; an open circuit keeps its model out that long, even after a reload), "
     "got 1e+300", f"routing: {{breaker: {{open_s: {MAX_OPEN_S}}}}}\n"),
    ("routing: {queue_timeout_ms: 1e300}\n", "routing.queue_timeout_ms",
     "must be at most 3600000 (an hour, as a model's timeouts.total_s), got 1e+300",
     "routing: {queue_timeout_ms: 3600000}\n"),
    ("store: {timeout_ms: 1e300}\n", "store.timeout_ms",
     "must be at most 3600000 (an hour; each Redis call of a request may wait this long), got 1e+300",
     "store: {timeout_ms: 3600000}\n"),
    ("store: {timeout_ms: 0.1}\n", "store.timeout_ms",
     "must be at least 1 (a Redis call cannot be answered sooner, even on the same host), got 0.1",
     "store: {timeout_ms: 1}\n"),
    ("routing: {stored_response_ttl_s: 2592001}\n", "routing.stored_response_ttl_s",
     "must be at most 2592000 (30 days, as long as OpenAI keeps a stored response), got 2592001",
     f"routing: {{stored_response_ttl_s: {MAX_PIN_TTL_S}}}\n"),
    ("energy: {sample_interval_s: 1e-300}\n", "energy.sample_interval_s",
     "must be at least 0.01 (10 ms; NVML refreshes power no faster), got 1e-300",
     f"energy: {{sample_interval_s: {MIN_SAMPLE_INTERVAL_S}}}\n"),
    ("ledger: {backups: 1000000000}\n", "ledger.backups",
     "must be at most 1000 (each rotation renames every backup), got 1000000000",
     f"ledger: {{backups: {MAX_BACKUPS}}}\n"),
]


def written(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("tail", "path", "message", "_at_limit"), PAST_THE_BOUND,
                         ids=[f"{case[1]}={case[2].rsplit('got ', 1)[1]}" for case in PAST_THE_BOUND])
def test_policy_check_refuses_a_value_past_its_bound_naming_the_limit(tmp_path, capsys, tail, path, message,
                                                                      _at_limit):
    """`gateway policy check` exits 1 with one problem: the file's line, the key path, the limit and why."""
    policy = written(tmp_path, BASE + tail)
    assert main(["--log-level", "WARNING", "policy", "check", str(policy)]) == 1
    out = capsys.readouterr()
    line = len(BASE.splitlines()) + 1
    assert f"{policy}:{line}: {path}: {message}" in out.out + out.err
    assert "1 problem(s)" in out.out + out.err


@pytest.mark.parametrize(("_tail", "path", "_message", "at_limit"), PAST_THE_BOUND,
                         ids=[f"{case[1]}-at-the-limit" for case in PAST_THE_BOUND])
def test_the_limit_itself_is_accepted(_tail, path, _message, at_limit):
    """The value at each limit loads, and is read as written."""
    policy = parse_policy(BASE + at_limit)
    node = policy
    for part in path.replace("[0]", "").split("."):
        node = node[0] if isinstance(node, tuple) else node
        node = getattr(node, part)
    assert str(node).removesuffix(".0") in at_limit


def test_a_reload_past_a_bound_keeps_the_running_policy():
    """A policy reloaded with a circuit open for 1e300 s is refused, naming the key and its limit; the gateway goes
    on with the policy it had."""
    template = standard_models(*DEFAULT_SIMS) + """routes:
  - {{name: chat, match: {{models: [auto]}}, candidates: [small]}}
routing: {{breaker: {{open_s: 30}}}}
"""
    gw = Harness(template).start()
    try:
        gw.write_policy(template.replace("open_s: 30", "open_s: 1e300"))
        assert gw.reload_policy() is False
        assert gw.holder.current.policy.routing.breaker.open_s == 30
        assert "routing.breaker.open_s: must be at most 604800" in gw.holder.status.error
        answer = gw.openai().chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=5)
        assert answer.choices[0].message.content
    finally:
        gw.stop()


def test_workers_with_a_grace_period_past_the_bound_are_refused_at_start(tmp_path):
    """`gateway run --workers 2` on a grace period of 1e6 s exits 1 at start, naming the key. It used to serve, then
    crash on SIGTERM: the supervisor waits three grace periods in one poll(2), which takes at most 2^31 ms, and raised
    OverflowError with a traceback, its workers' drain unsupervised."""
    policy = written(tmp_path, WORKERS_POLICY.replace("grace_period_s: 2", "grace_period_s: 1e6"))
    gateway = Workers(policy, workers=2)
    try:
        try:
            gateway.process.wait(30)
        except subprocess.TimeoutExpired:
            gateway.process.send_signal(signal.SIGTERM)     # what broke before: the stop of a running gateway
            gateway.process.wait(30)
        assert gateway.process.returncode == 1, gateway.text()
        assert "server.grace_period_s: must be at most 86400" in gateway.text()
        assert "OverflowError" not in gateway.text()
    finally:
        gateway.stop()


def test_workers_with_the_longest_grace_period_stop_cleanly_on_sigterm(tmp_path):
    """A grace period at the limit (a day) serves, and SIGTERM stops the idle workers at once, exit status 0."""
    policy = written(tmp_path, WORKERS_POLICY.replace("grace_period_s: 2", f"grace_period_s: {MAX_GRACE_PERIOD_S}"))
    gateway = Workers(policy, workers=2).wait_serving()
    try:
        pids = gateway.pids()
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(30)
        assert gateway.process.returncode == 0, gateway.text()
        wait_for(lambda: not any(alive(pid) for pid in pids), gateway.text)
        assert "Traceback" not in gateway.text()
    finally:
        gateway.stop()


def test_an_answer_cached_for_the_longest_ttl_is_served_from_redis(redis_server):
    """With ttl_s at the limit (ten years) Redis keeps the answer and the second request is a hit. Past Redis's own
    limit (about 2^63 ms from now, ttl_s 9223372036854775) Redis refused every write: each answer was "stored" and
    none ever served, which the loader now refuses."""
    template = standard_models(*DEFAULT_SIMS) + textwrap.dedent(f"""\
        routes:
          - name: chat
            match: {{{{models: [auto]}}}}
            candidates: [small]
            cache: {{{{enabled: true, ttl_s: {MAX_CACHE_TTL_S}}}}}
        """)
    environ = {**{k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}, "OTEL_SDK_DISABLED": "true",
               "GATEWAY_REDIS_URL": redis_server.url}
    gw = Harness(template, environ=environ).start()
    try:
        client = gw.openai()
        request = dict(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        first = client.chat.completions.with_raw_response.create(**request)
        assert first.headers["x-gateway-cache"] == "stored"
        wait_for(lambda: client.chat.completions.with_raw_response.create(**request).headers["x-gateway-cache"]
                 == "hit")
    finally:
        gw.stop()


@pytest.mark.parametrize("key", ["connect_s", "first_byte_s", "total_s"])
def test_a_model_timeout_under_a_millisecond_is_refused_and_one_millisecond_taken(tmp_path, capsys, key):
    """A timeout under 1 ms (seconds written where milliseconds were meant) failed every call to the model at
    once: `gateway policy check` names the key, the limit and why."""
    model = '  small: {{endpoint: "http://127.0.0.1:9101/v1", timeouts: {{{key}: {value}}}}}\n'
    policy = written(tmp_path, BASE.replace('  small: {endpoint: "http://127.0.0.1:9101/v1"}\n',
                                            model.format(key=key, value="0.0001")))
    assert main(["--log-level", "WARNING", "policy", "check", str(policy)]) == 1
    out = capsys.readouterr()
    assert (f"{policy}:3: models.small.timeouts.{key}: must be at least 0.001 (1 ms; no model server answers "
            f"sooner), got 0.0001") in out.out + out.err
    at_limit = parse_policy(BASE.replace('  small: {endpoint: "http://127.0.0.1:9101/v1"}\n',
                                         model.format(key=key, value=MIN_TIMEOUT_S)))
    assert getattr(at_limit.models["small"].timeouts, key) == MIN_TIMEOUT_S
