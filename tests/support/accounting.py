"""Helpers for the accounting end-to-end tests: the ledger file, POST /v1/outcomes, GET /admin/stats, prices."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

MILLION = Decimal(1_000_000)


def ledger_lines(path: Path) -> list[dict]:
    """Every complete record in the ledger file so far (a line still being written is left out)."""
    if not path.exists():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete]


def ledger_find(path: Path, wanted, timeout_s: float = 30.0) -> list[dict]:
    """The ledger records `wanted(record)` accepts, waiting until the writer thread has written one (a bound for a
    loaded machine only: a stream of megabytes without usage is counted for seconds before its line is written)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [record for record in ledger_lines(path) if wanted(record)]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no ledger line matched within {timeout_s} s")


def ledger_record(path: Path, request_id: str) -> dict:
    """The ledger line of one request."""
    (record,) = ledger_find(path, lambda r: r.get("request_id") == request_id and r.get("type") != "outcome")
    return record


def api_cost(input_tokens: int, output_tokens: int, input_price: str, output_price: str) -> Decimal:
    """Tokens x USD per million tokens, by hand."""
    return (input_tokens * Decimal(input_price) + output_tokens * Decimal(output_price)) / MILLION


def post_outcome(base_url: str, body: object = None, *, raw: bytes | None = None,
                 api_key: str | None = None) -> tuple[int, dict]:
    """POST /v1/outcomes: (status, JSON body), errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{base_url}/v1/outcomes", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def admin_stats(base_url: str, admin_token: str) -> dict:
    """GET /admin/stats with the admin token."""
    request = urllib.request.Request(f"{base_url}/admin/stats",
                                     headers={"Authorization": f"Bearer {admin_token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
