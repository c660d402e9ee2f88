"""One error tree for the whole gateway.

    GatewayError                         (500, api_error)
    ├── ClientError                      (400, invalid_request_error)
    │   ├── ClientTooSlow                (408, request_timeout)
    │   ├── ExpectationFailed            (417, expectation_failed)
    │   ├── BodyTooLarge                 (413)
    │   ├── AuthenticationFailed         (401, authentication_error)
    │   ├── PermissionDenied             (403, permission_error)
    │   ├── NotFound                     (404)
    │   ├── RateLimited                  (429, rate_limit_exceeded)
    │   └── BudgetExceeded               (429, budget_exceeded)
    ├── NoModelMeetsSla                  (503, service_unavailable)
    ├── ShuttingDown                     (503, service_unavailable)
    ├── StoreUnavailable                 (503, store_unavailable)
    ├── UpstreamError                    (502, upstream_error)
    │   ├── UpstreamUnreachable          (502)
    │   ├── UpstreamTimeout              (504)
    │   ├── UpstreamStatus               (the upstream's status)
    │   └── UpstreamProtocolError        (502)
    └── PolicyError                      (never reaches a client: start-up and reload)

Each error knows its HTTP status and the OpenAI error `type` and `code`, so
the outermost middleware can answer any of them in OpenAI's error shape. A
request the parse stage refuses carries the `code` OpenAI's API gives it
(`missing_required_parameter`, `invalid_type`, ..., or null) and its `param`.
Foreign exceptions are translated where they enter, with `raise ... from`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson


class _ClassCode:
    """What `code=` is when left out: the error keeps its class's code (an explicit None is OpenAI's
    `"code": null`)."""


CLASS_CODE = _ClassCode()


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status = 500
    error_type = "api_error"
    code: str | None = "internal_error"
    #: the connection is closed after the answer (what is left of the request on it cannot be read in time)
    closes_connection = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None | _ClassCode = CLASS_CODE,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if not isinstance(code, _ClassCode):
            self.code = code
        self.headers = headers or {}

    @property
    def retry_helps(self) -> bool:
        """Whether the same request may succeed if the client sends it again (False answers carry
        `x-should-retry: false`, which the OpenAI SDKs obey instead of retrying a 429 or 5xx)."""
        return self.code not in FINAL_CODES

    def body(self) -> dict:
        """The OpenAI error body for this error."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "code": self.code, "param": self.param}}


class ClientError(GatewayError):
    """The request itself is wrong."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedInput(ClientError):
    """The request uses what no model of its route takes (images, audio, files, tools: a model's `supports`)."""

    code = "unsupported_value"


class ClientTooSlow(ClientError):
    """The client stopped sending its request for longer than `server.client_timeout_s`."""

    status = 408
    code = "request_timeout"
    closes_connection = True


class ExpectationFailed(ClientError):
    """An `Expect` header other than 100-continue."""

    status = 417
    code = "expectation_failed"


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class AuthenticationFailed(ClientError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ClientError):
    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(ClientError):
    status = 404
    code = "model_not_found"


class RateLimited(ClientError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(RateLimited):
    code = "budget_exceeded"


class NoModelMeetsSla(GatewayError):
    """No candidate of the route meets its SLA and the route says reject."""

    status = 503
    error_type = "service_unavailable_error"
    code = "sla_unmet"


class ShuttingDown(GatewayError):
    """The gateway is stopping and its grace period ran out before this request ended: try again (another
    replica, or this one once restarted)."""

    status = 503
    error_type = "service_unavailable_error"
    code = "shutting_down"


class StoreUnavailable(GatewayError):
    """The shared store (Redis) is down and the policy says deny."""

    status = 503
    error_type = "service_unavailable_error"
    code = "store_unavailable"


class UpstreamError(GatewayError):
    """The model server failed us; the fallback loop may try another."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_error"
    #: short machine-readable reason, recorded as the fallback reason and error.type
    reason = "upstream_error"
    retry_after_s: float | None = None
    #: whether the failure says something about the model's health (its circuit breaker counts it)
    model_at_fault = True

    def retry_headers(self) -> dict[str, str]:
        """The model's Retry-After for the client, also to the millisecond as `retry-after-ms`, which OpenAI's SDKs
        read first; none when it sent none."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(math.ceil(self.retry_after_s)),
                "retry-after-ms": str(math.ceil(self.retry_after_s * 1000))}


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"
    reason = "connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    reason = "timeout"


class NotSent(UpstreamError):
    """A call the gateway did not send after waiting for its call slot: nothing about the model's health; the
    next model is tried, and with none left the client may try again in a second."""

    status = 503
    error_type = "service_unavailable_error"
    retry_after_s = 1.0
    model_at_fault = False


class ModelBusy(NotSent):
    """No call slot on a saturated model came within routing.queue_timeout_ms."""

    code = "model_overloaded"
    reason = "queue_timeout"


class CircuitOpen(NotSent):
    """A model's circuit opened while a call waited for its slot."""

    code = "model_unavailable"
    reason = "circuit_open"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_bad_response"
    reason = "bad_response"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status."""

    def __init__(self, message: str, *, upstream_status: int, body: dict | None = None,
                 retry_after_s: float | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.final = final                  # the model said `x-should-retry: false`: sending it again cannot help
        self.upstream_body = body
        self.retry_after_s = retry_after_s
        self.status = upstream_status if 400 <= upstream_status < 600 else 502
        self.param = upstream_param(body)
        if upstream_status == 429:
            self.error_type, self.code, self.reason = "rate_limit_error", "rate_limit_exceeded", "rate_limited"
        elif upstream_status >= 500:
            self.reason = f"http_{upstream_status}"
        elif upstream_status in UPSTREAM_NOT_SERVED_STATUSES:
            # the model server does not serve this model or path (upstream_model or endpoint misconfigured): the
            # gateway's set-up, not the client's request, which never names the upstream's model or path
            self.status, self.error_type, self.code, self.reason = 502, "upstream_error", "upstream_not_found", \
                "not_found"
        elif upstream_status in UPSTREAM_AUTH_STATUSES:
            # the model server refused the gateway's own credential: not the client's fault, maybe not another
            # model's (each has its own api_key_env)
            self.status, self.error_type, self.code, self.reason = 502, "upstream_error", "upstream_auth_failed", \
                "auth_failed"
        elif is_context_length_error(body):
            self.error_type, self.code, self.reason = "invalid_request_error", "context_length_exceeded", "context_length"
        else:
            self.error_type, self.code, self.reason = "invalid_request_error", "upstream_rejected", f"http_{upstream_status}"

    def body(self) -> dict:
        """The OpenAI error body: for a refusal the client's request caused (a 4xx other than the model server
        refusing the gateway's credential or serving no such model, a 429), the model's own `type`, `code` and
        other fields (Azure's `innererror` with its content-filter results) when it sent them, as a client
        talking to it directly would read them (`content_filter`, `insufficient_quota`); the gateway's
        otherwise. `self.code` stays the gateway's: it names the outcome in metrics, whose labels stay bounded."""
        body = super().body()
        error = self.upstream_body.get("error") if isinstance(self.upstream_body, dict) else None
        if not isinstance(error, dict) or self.upstream_status >= 500 or self.status == 502:
            return body
        shown = body["error"]
        for name, value in error.items():
            if name in ("type", "code"):
                if isinstance(value, str) and 0 < len(value) <= MAX_PASSED_CODE_CHARS:
                    shown[name] = value
            elif name not in shown and passable(value):
                shown[name] = value
        return body

    @property
    def retry_helps(self) -> bool:
        """As for any error, unless the model itself said sending the request again cannot help (its
        `x-should-retry: false`, which OpenAI's SDKs would have obeyed talking to it directly)."""
        return super().retry_helps and not self.final

    @property
    def retryable(self) -> bool:
        """Whether another model may succeed where this one failed."""
        return self.upstream_status == 429 or self.upstream_status >= 500 or self.reason in ("context_length",
                                                                                               "auth_failed",
                                                                                               "not_found")


#: the longest `type` or `code` of a model's error passed on to the client
MAX_PASSED_CODE_CHARS = 64
#: the longest other field of a model's error passed on to the client, as JSON (Azure's `innererror` with its
#: content-filter results takes about 500)
MAX_PASSED_FIELD_CHARS = 2000


def passable(value: object) -> bool:
    """Whether a field of a model's error (other than its message, type and code) may reach the client: small,
    and holding no stack trace (the model server's files, code and hosts are its own, as in its message)."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return len(text) <= MAX_PASSED_FIELD_CHARS and "Traceback (most recent call last)" not in text
#: a model server's answers that mean the gateway's credential for it is wrong
UPSTREAM_AUTH_STATUSES = frozenset({401, 403, 407})
#: a model server's answers that mean it serves no such model or path: the model's upstream_model or endpoint
UPSTREAM_NOT_SERVED_STATUSES = frozenset({404, 405})
#: the codes of errors that sending the same request again cannot fix, however long the client waits: a request
#: past the tenant's tokens per minute, a model server refusing the gateway's own credential or serving no such model
FINAL_CODES = frozenset({"request_too_large", "upstream_auth_failed", "upstream_not_found"})


def upstream_param(body: dict | None) -> str | None:
    """The request field an upstream error names (`param`: "messages", "response_format"), kept for the client as
    OpenAI would have sent it; None when the body names none."""
    error = body.get("error") if isinstance(body, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    return param if isinstance(param, str) else None


def is_context_length_error(body: dict | None) -> bool:
    """Whether an upstream error body says the prompt was too long for the model."""
    if not isinstance(body, dict):
        return False
    error = body.get("error")
    if not isinstance(error, dict):
        return False
    text = f"{error.get('code') or ''} {error.get('type') or ''} {error.get('message') or ''}".lower()
    # OpenAI and vLLM: context_length_exceeded, "maximum context length"; llama.cpp: exceed_context_size_error,
    # "exceeds the available context size"
    return any(words in text for words in _CONTEXT_LENGTH_WORDS)


_CONTEXT_LENGTH_WORDS = ("context_length", "maximum context length", "exceed_context_size", "context size")


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong in a policy file, located precisely."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '<root>'}: {self.message}"


class PolicyError(GatewayError):
    """A policy file could not be loaded; carries every problem found."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems) or "invalid policy")
