"""The real gateway in front of real simulated backends, on 127.0.0.1, in a background thread.

Tests talk to it with the official openai SDK (sync or async) and plain HTTP,
exactly as applications do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

from aiohttp import web

from gateway.app import build_app
from gateway.runtime import PolicyHolder
from gateway.server import GatewayRunner
from gateway.services import SERVICES
from gateway.simulator import SimConfig, start_simulators
from tests.support.policies import SMART_AND_EMBEDDINGS_ROUTES, standard_models
from tests.support.raw_upstream import RawUpstream

#: the models every test policy can use: name -> simulator settings
DEFAULT_SIMS = {
    "small": dict(ttft_ms=5, tpot_ms=1),
    "medium": dict(ttft_ms=10, tpot_ms=2),
    "large": dict(ttft_ms=20, tpot_ms=3),
}

#: the standard models, one per default simulator, and the routes most tests ask for
DEFAULT_POLICY = standard_models(*DEFAULT_SIMS) + """
routes:
  - name: chat-default
    match: {{models: ["auto", "gpt-4o-mini"], endpoints: [chat, completions]}}
    candidates: [small, medium, large]
    sla: {{p95_latency_ms: 2000, min_tier: 1}}
    fallback: [large]
    cache: {{enabled: true, ttl_s: 60}}
""" + SMART_AND_EMBEDDINGS_ROUTES


#: a `tail` for raw_model_policy: route `raw-cached`, the scripted model with the cache on
RAW_CACHED_ROUTE = """  - name: raw-cached
    match: {{models: ["raw-cached"]}}
    candidates: [raw]
    cache: {{enabled: true, ttl_s: 60}}
"""


def raw_model_policy(raw_url: str, *, first_byte_s: float, tail: str = "", total_s: float = 10,
                     raw_keys: str = "") -> str:
    """The standard models plus `raw`, a scripted model server at `raw_url`: route `raw` falls back to `medium`,
    route `raw-only` has no fallback; `tail` adds routes or sections, `raw_keys` lines of keys to model `raw`
    (each a template, braces doubled)."""
    head = standard_models(*DEFAULT_SIMS)
    return head + f"""  raw:
    endpoint: {raw_url}
    upstream_model: fake
    size_b: 0.5
    latency_prior: {{{{ttft_ms: 5, tpot_ms: 1}}}}
    timeouts: {{{{connect_s: 1, first_byte_s: {first_byte_s}, total_s: {total_s}}}}}
{raw_keys}routes:
  - name: raw
    match: {{{{models: ["raw"]}}}}
    candidates: [raw]
    fallback: [medium]
  - name: raw-only
    match: {{{{models: ["raw-only"]}}}}
    candidates: [raw]
""" + tail


class Harness:
    """Simulators and a gateway running on their own event loop thread."""

    def __init__(self, policy_template: str = DEFAULT_POLICY, sims: Mapping[str, dict] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.policy_template = policy_template
        self.sim_settings = dict(DEFAULT_SIMS if sims is None else sims)
        self.environ = dict(os.environ if environ is None else environ)
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-test-"))
        self.policy_path = self.workdir / "policy.yaml"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sims: dict = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    # lifecycle -------------------------------------------------------------
    def start(self) -> "Harness":
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        configs = [SimConfig(name=f"sim-{name}", port=0, seed=index, **settings)
                   for index, (name, settings) in enumerate(self.sim_settings.items())]
        running = await start_simulators(configs)
        self.sims = dict(zip(self.sim_settings, running))
        self.write_policy(self.policy_template)
        self.holder = PolicyHolder.from_file(self.policy_path, self.environ)
        self.app = build_app(self.holder, environ=self.environ)
        self.runner = GatewayRunner(self.app, handler_cancellation=True, shutdown_timeout=5, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.runner is not None:
            self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop(self) -> None:
        await self.runner.cleanup()
        for sim in self.sims.values():
            await sim.stop()

    def call(self, coro, timeout_s: float = 30):
        """Run a coroutine on the harness loop and wait for its result."""
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    # helpers ---------------------------------------------------------------
    def flush_telemetry(self) -> bool:
        """Export what the gateway recorded: first let its loop run the recordings already scheduled
        (requests are recorded in a loop callback just after their response), then flush."""
        self.call(asyncio.sleep(0))
        return self.services.telemetry.force_flush()

    def write_policy(self, template: str) -> None:
        """Write a policy whose {small}/{medium}/{large} are the simulators' URLs."""
        urls = {name: sim.url for name, sim in self.sims.items()}
        self.policy_path.write_text(template.format(**urls))

    def reload_policy(self) -> bool:
        """Read the policy file again (`PolicyHolder.reload`), on the gateway's own loop; whether it was taken."""
        async def reload() -> bool:
            return self.holder.reload()
        return self.call(reload())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def services(self):
        return self.app[SERVICES]

    def sim_config(self, name: str, **changes) -> dict:
        """Change a simulator's behaviour at run time (POST /sim/config)."""
        return self.http("POST", f"{self.sims[name].control_url}/config", changes)

    def sim_requests(self, name: str, last: int = 50) -> list[dict]:
        return self.http("GET", f"{self.sims[name].control_url}/requests?last={last}")["requests"]

    def sim_stats(self, name: str) -> dict:
        return self.http("GET", f"{self.sims[name].control_url}/stats")

    @staticmethod
    def http(method: str, url: str, body: object = None, headers: Mapping[str, str] | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "test-key"),
                      max_retries=kwargs.pop("max_retries", 0), timeout=kwargs.pop("timeout", 20), **kwargs)

    def async_openai(self, **kwargs):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "test-key"),
                           max_retries=0, timeout=kwargs.pop("timeout", 20), **kwargs)


def ledgered_harness(policy_template: str, ledger_dir: Path, **kwargs) -> Harness:
    """A started Harness on `policy_template` writing its ledger to `ledger_dir/ledger.jsonl` (`harness.ledger_path`);
    `kwargs` as Harness takes them."""
    ledger = ledger_dir / "ledger.jsonl"
    harness = Harness(policy_template + f'ledger: {{{{path: "{ledger}"}}}}\n', **kwargs).start()
    harness.ledger_path = ledger
    return harness


@contextlib.contextmanager
def raw_model_gateway(*, first_byte_s: float, tail: str = "", total_s: float = 10, raw_keys: str = "",
                      raw: RawUpstream | None = None) -> Iterator[tuple[Harness, RawUpstream]]:
    """A gateway on `raw_model_policy` (fast simulators for the standard models) and its scripted model server
    (`raw`, not started yet: a RawUpstream by default)."""
    raw = (raw or RawUpstream()).start()
    harness = Harness(raw_model_policy(raw.url, first_byte_s=first_byte_s, tail=tail, total_s=total_s,
                                       raw_keys=raw_keys),
                      sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS}).start()
    try:
        yield harness, raw
    finally:
        harness.stop()
        raw.stop()


@contextlib.contextmanager
def ledgered_raw_model_gateway(ledger_dir: Path, *, first_byte_s: float, tail: str = "", total_s: float = 10,
                               raw_keys: str = "", raw: RawUpstream | None = None
                               ) -> Iterator[tuple[Harness, RawUpstream]]:
    """`raw_model_gateway` writing its ledger to `ledger_dir/requests.jsonl` (`harness.ledger_path`)."""
    ledger = ledger_dir / "requests.jsonl"
    with raw_model_gateway(first_byte_s=first_byte_s, tail=tail + f'ledger: {{{{path: "{ledger}"}}}}\n',
                           total_s=total_s, raw_keys=raw_keys, raw=raw) as (harness, raw):
        harness.ledger_path = ledger
        yield harness, raw


def reset_raw_model(harness: Harness, raw: RawUpstream) -> None:
    """Between tests: no script, no request received, every circuit closed, and no refusal of `stream_options`
    remembered."""
    raw.script = []
    raw.script_for = None
    raw.requests.clear()
    harness.services.fleet.breakers._circuits.clear()
    harness.services.fleet.refuse_stream_options.clear()
