"""`gateway policy explain`: which model would this request get, and why.

It runs the very function that routes live requests (`decide_request`), on
the policy's latency priors (a fresh gateway has measured nothing yet).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from multidict import CIMultiDict

from gateway.errors import AuthenticationFailed, GatewayError, PolicyError
from gateway.fleet import Fleet
from gateway.routing.explain import format_decision
from gateway.routing.needs import request_needs
from gateway.routing.request import decide_request
from gateway.runtime import Runtime
from gateway.stages.parse import choices_of, max_tokens_of, parse_json_object, validate_body
from gateway.tokens import DEFAULT_ENCODING, count_prompts
from gateway.policy.load import load_policy


def parse_headers(pairs: list[str]) -> CIMultiDict:
    """`K:V` command-line pairs as request headers; one of another form is a usage error of `--header` (the
    command line is wrong, not the request it describes)."""
    headers: CIMultiDict = CIMultiDict()
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"gateway policy explain: error: argument --header: must look like NAME:VALUE, "
                             f"got {pair!r}")
        headers.add(name.strip(), value.strip())
    return headers


def explain(runtime: Runtime, fleet: Fleet, *, endpoint: str, body: dict, headers, tenant_name: str | None):
    """The decision for one request, exactly as the live route stage would make it."""
    validate_body(endpoint, body)
    tenant = runtime.policy.tenants.get(tenant_name) if tenant_name else None
    if tenant_name and tenant is None:       # the command line is wrong, not the request it describes
        raise UsageError(f"gateway policy explain: error: argument --tenant: no tenant named {tenant_name!r} in the "
                         f"policy (its tenants: {', '.join(sorted(runtime.policy.tenants)) or 'none'})")
    if not tenant_name and runtime.policy.tenants:     # live, a request without a key never reaches routing
        raise AuthenticationFailed(f"the policy has tenants, so a request without an API key is refused: pass "
                                   f"--tenant NAME (one of {', '.join(sorted(runtime.policy.tenants))})")
    prompt_tokens, longest_prompt_tokens = count_prompts(endpoint, body, DEFAULT_ENCODING)
    stream = bool(body.get("stream")) and endpoint != "embeddings"
    decision, _ = decide_request(runtime, fleet.router(runtime.policy), endpoint=endpoint, alias=body["model"],
                                 tenant=tenant, headers=headers, prompt_tokens=prompt_tokens,
                                 max_tokens=max_tokens_of(body, endpoint), stream=stream,
                                 choices=choices_of(endpoint, body),
                                 longest_prompt_tokens=longest_prompt_tokens, needs=request_needs(endpoint, body))
    return decision, (prompt_tokens, longest_prompt_tokens)


class _NeverExplore(random.Random):
    """The router's coin never lands on exploring: explain shows the planned choice, the same every run."""

    def random(self) -> float:
        return 1.0


def read_request(path: Path) -> bytes:
    """The request body from its file, or stdin for `-`; a file that cannot be read is a usage error."""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the request file {path}: {exc.strerror or exc}") from exc


class UsageError(Exception):
    """The command was asked for something it cannot do (exit 2, but not a refused request)."""


def explain_main(args: argparse.Namespace) -> int:
    try:
        headers = parse_headers(args.header)       # a usage error, said before the policy or the request is read
        policy = load_policy(args.file)
        runtime = Runtime.build(policy, os.environ)
        raw = read_request(args.request)
        decision, (prompt_tokens, longest) = explain(
            runtime, Fleet(policy, rng=_NeverExplore()), endpoint=args.endpoint, body=parse_json_object(raw),
            headers=headers, tenant_name=args.tenant)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (GatewayError, ValueError) as exc:
        print(f"request would be refused: {getattr(exc, 'status', '')} {exc}".replace("  ", " "), file=sys.stderr)
        return 2
    batch = f"; longest prompt {longest}, which each model's context must hold" if longest != prompt_tokens else ""
    print(f"prompt tokens: {prompt_tokens} ({DEFAULT_ENCODING}{batch})")
    print(format_decision(decision))
    print(f"choice: {decision.plan[0].name if decision.plan else 'none'}")
    if (share := policy.routing.explore_share) > 0:
        print(f"(routing.explore_share {share:g}: live, that share of such requests goes to another eligible "
              "candidate to keep its estimate fresh)")
    return 0
