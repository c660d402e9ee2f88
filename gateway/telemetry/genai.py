"""The GenAI attribute mapping: RequestContext -> span and metric attributes.

Pure functions with no OpenTelemetry SDK import, following the semantic
conventions v1.41.0 (GenAI set). Only the constant modules of
`opentelemetry-semantic-conventions` are used. No value is ever None: OTel
rejects None attribute values, so a key is left out when its value is unknown.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    url_attributes,
    user_agent_attributes,
)

from gateway.background import background_status
from gateway.context import CLIENT_DISCONNECTED
from gateway.errors import GatewayError, NoModelMeetsSla

if TYPE_CHECKING:
    from gateway.context import Attempt, RequestContext

#: the semantic conventions these attributes follow
SCHEMA_URL = "https://opentelemetry.io/schemas/1.41.0"

# the gateway's own attributes (no semantic convention exists for them)
TENANT = "gateway.tenant"
ROUTE = "gateway.route"
MODEL_SELECTED = "gateway.model.selected"
FALLBACK_STATE = "gateway.fallback.state"
FALLBACK_REASON = "gateway.fallback.reason"
CACHE_STATUS = "gateway.cache.status"
SLA_MET = "gateway.sla.met"
SLA_TIGHTENED = "gateway.sla.tightened"
COST_USD = "gateway.cost.usd"
ENERGY_J = "gateway.energy.joules"
TOKENS_ESTIMATED = "gateway.tokens.estimated"
REQUEST_ID = "gateway.request.id"
OUTCOME = "gateway.outcome"
QUEUE_WAIT_S = "gateway.queue.wait"
BUDGET_DOWNGRADED = "gateway.budget.downgraded"
#: how a background response ended (`gateway.background`): completed, incomplete, failed, cancelled, unsettled
BACKGROUND_STATUS = "gateway.background.status"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def server_span_attributes(ctx: RequestContext) -> dict[str, Any]:
    """HTTP server attributes known when the request arrives (the sampler sees them)."""
    return http_server_attributes(ctx.http, ctx.request_id, ctx.tenant.name if ctx.tenant is not None else None)


def http_server_attributes(request, request_id: str, tenant_name: str | None) -> dict[str, Any]:
    """HTTP server attributes of any request the gateway serves, known when it arrives."""
    attributes: dict[str, Any] = {
        http_attributes.HTTP_REQUEST_METHOD: request.method,
        http_attributes.HTTP_ROUTE: http_route(request),
        url_attributes.URL_PATH: request.path,
        url_attributes.URL_SCHEME: request.scheme,
        REQUEST_ID: request_id,
    }
    if request.query_string:                # conditionally required: when the request had one
        attributes[url_attributes.URL_QUERY] = url_query(request.query_string)
    user_agent = request.headers.get("User-Agent")
    if user_agent:
        attributes[user_agent_attributes.USER_AGENT_ORIGINAL] = user_agent
    if tenant_name is not None:
        attributes[TENANT] = tenant_name
    return attributes


#: query parameters whose values url.query never carries (the conventions' list, and API keys sent as a query)
_SECRET_QUERY_KEYS = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature", "api-key", "api_key",
                                "key", "access_token", "token"})


def url_query(query: str) -> str:
    """The query string as url.query, each secret parameter's value replaced by `REDACTED`."""
    pairs = query.split("&")
    for index, pair in enumerate(pairs):
        key, sep, _value = pair.partition("=")
        if sep and unquote(key).lower() in _SECRET_QUERY_KEYS:
            pairs[index] = f"{key}=REDACTED"
    return "&".join(pairs)


def http_route(request: Any) -> str:
    """The matched route template (low cardinality), else the path."""
    resource = getattr(getattr(request.match_info, "route", None), "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if isinstance(canonical, str) else request.path


def attempt_attributes(ctx: RequestContext, attempt: Attempt) -> dict[str, Any]:
    """GenAI client attributes of one upstream attempt: request side, and response side once known."""
    model = attempt.model
    attributes: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: ctx.operation,
        gen_ai.GEN_AI_PROVIDER_NAME: model.provider,
        gen_ai.GEN_AI_REQUEST_MODEL: model.upstream_model,
        **server_address(model.endpoint),
        **request_parameters(ctx),
    }
    if ctx.stream:
        attributes[gen_ai.GEN_AI_REQUEST_STREAM] = True
    attributes.update(_response_attributes(ctx, attempt))
    if attempt.error_type:
        attributes[error_attributes.ERROR_TYPE] = attempt.error_type
    return attributes


def attempt_end_attributes(ctx: RequestContext, attempt: Attempt) -> dict[str, Any]:
    """What an attempt's end adds to its CLIENT span: the response side, and error.type on failure."""
    attributes = dict(_response_attributes(ctx, attempt))
    if attempt.error_type:
        attributes[error_attributes.ERROR_TYPE] = attempt.error_type
    return attributes


def span_name(ctx: RequestContext, attempt: Attempt) -> str:
    """`{gen_ai.operation.name} {gen_ai.request.model}`, the CLIENT span's name."""
    return f"{ctx.operation} {attempt.model.upstream_model}"


def request_parameters(ctx: RequestContext) -> dict[str, Any]:
    """gen_ai.request.* parameters the client sent, when well typed (recommended, or conditionally required,
    on inference and embeddings spans)."""
    body = ctx.body
    if ctx.endpoint == "embeddings":
        return _embeddings_parameters(body)
    max_tokens = ctx.max_tokens if ctx.max_tokens is not None else body.get("max_tokens",
                                                                            body.get("max_completion_tokens"))
    candidates = ((gen_ai.GEN_AI_REQUEST_MAX_TOKENS, max_tokens, int),
                  (gen_ai.GEN_AI_REQUEST_TEMPERATURE, body.get("temperature"), float),
                  (gen_ai.GEN_AI_REQUEST_TOP_P, body.get("top_p"), float),
                  (gen_ai.GEN_AI_REQUEST_TOP_K, body.get("top_k"), float),
                  (gen_ai.GEN_AI_REQUEST_FREQUENCY_PENALTY, body.get("frequency_penalty"), float),
                  (gen_ai.GEN_AI_REQUEST_PRESENCE_PENALTY, body.get("presence_penalty"), float),
                  (gen_ai.GEN_AI_REQUEST_SEED, body.get("seed"), int))
    attributes = {key: kind(value) for key, value, kind in candidates if _is_number(value, kind)}
    choices = body.get("n")
    if _is_number(choices, int) and choices != 1:          # conditionally required: when sent and not 1
        attributes[gen_ai.GEN_AI_REQUEST_CHOICE_COUNT] = choices
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list) and stops and all(isinstance(item, str) for item in stops):
        attributes[gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES] = tuple(stops)
    output_format = body.get("response_format")
    if ctx.endpoint == "responses":         # the Responses API names it `text.format`
        text = body.get("text")
        output_format = text.get("format") if isinstance(text, dict) else None
    output_type = _output_type(output_format)
    if output_type is not None:
        attributes[gen_ai.GEN_AI_OUTPUT_TYPE] = output_type
    return attributes


#: OpenAI response_format.type -> gen_ai.output.type (the requested modality, not its exact format)
_OUTPUT_TYPES = {"text": "text", "json_object": "json", "json_schema": "json"}


def _output_type(response_format: Any) -> str | None:
    """gen_ai.output.type of a request that names an output format (conditionally required then)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    return _OUTPUT_TYPES.get(kind) if isinstance(kind, str) else None


def _embeddings_parameters(body: dict[str, Any]) -> dict[str, Any]:
    """gen_ai.request.encoding_formats and gen_ai.embeddings.dimension.count of an embeddings request."""
    attributes: dict[str, Any] = {}
    encoding = body.get("encoding_format")
    if isinstance(encoding, str) and encoding:
        attributes[gen_ai.GEN_AI_REQUEST_ENCODING_FORMATS] = (encoding,)
    dimensions = body.get("dimensions")
    if _is_number(dimensions, int):
        attributes[gen_ai.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = dimensions
    return attributes


def _is_number(value: Any, kind: type) -> bool:
    """Whether a JSON value is a number of the kind (bools are not numbers here)."""
    if isinstance(value, bool) or value is None:
        return False
    if kind is int:                 # an OTLP int is an int64: a larger one cannot be exported
        return isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX
    return isinstance(value, (int, float))


def _response_attributes(ctx: RequestContext, attempt: Attempt) -> Iterator[tuple[str, Any]]:
    """Response-side attributes: ids, finish reasons, usage, time to first chunk."""
    if attempt.response_model:
        yield gen_ai.GEN_AI_RESPONSE_MODEL, attempt.response_model
    if attempt.response_id:
        yield gen_ai.GEN_AI_RESPONSE_ID, attempt.response_id
    if attempt.finish_reasons:
        yield gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, tuple(attempt.finish_reasons)
    if ctx.stream and attempt.ttft_s is not None:
        yield gen_ai.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, float(attempt.ttft_s)
    usage = attempt.usage
    if usage is None:
        return
    yield gen_ai.GEN_AI_USAGE_INPUT_TOKENS, usage.input_tokens
    if ctx.endpoint != "embeddings":
        yield gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS, usage.output_tokens
    if usage.cached_input_tokens:
        yield gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, usage.cached_input_tokens
    if usage.reasoning_tokens:
        yield gen_ai.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, usage.reasoning_tokens


def server_address(endpoint: str) -> dict[str, Any]:
    """server.address and server.port of a model endpoint URL."""
    return dict(_server_address(endpoint))


@lru_cache(maxsize=1024)
def _server_address(endpoint: str) -> tuple[tuple[str, Any], ...]:
    """Parsed once per endpoint: a policy names few of them, and every attempt needs them."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return ()
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    address: dict[str, Any] = {server_attributes.SERVER_ADDRESS: parts.hostname}
    if port:
        address[server_attributes.SERVER_PORT] = port
    return tuple(address.items())


def gateway_attributes(ctx: RequestContext) -> dict[str, Any]:
    """The gateway's own attributes of a finished request."""
    attributes: dict[str, Any] = {
        TENANT: ctx.tenant_name,
        FALLBACK_STATE: ctx.fallback_state,
        CACHE_STATUS: ctx.cache_status,
        COST_USD: float(ctx.cost_usd),
        TOKENS_ESTIMATED: ctx.usage.estimated,
        OUTCOME: outcome(ctx),
    }
    optional = ((ROUTE, ctx.route_name), (MODEL_SELECTED, ctx.model_selected),
                (FALLBACK_REASON, ctx.fallback_reason),
                (ENERGY_J, float(ctx.energy_j) if ctx.energy_j is not None else None))
    attributes.update((key, value) for key, value in optional if value is not None)
    if ctx.decision is not None:
        attributes[SLA_MET] = ctx.decision.sla_met
    if ctx.budget_downgrade:
        attributes[BUDGET_DOWNGRADED] = True
    if (background := background_status(ctx)) is not None:
        attributes[BACKGROUND_STATUS] = background
    queued_s = sum(attempt.queued_s for attempt in ctx.attempts)
    if queued_s:
        attributes[QUEUE_WAIT_S] = queued_s
    return attributes


def http_response_attributes(ctx: RequestContext) -> dict[str, Any]:
    """http.response.status_code, and error.type for a failed request: a 5xx answer, or one that broke after
    its 2xx head was sent (the error went in-band, so the status code cannot say it; the outcome code does)."""
    status = sent_status(ctx)
    attributes: dict[str, Any] = {http_attributes.HTTP_RESPONSE_STATUS_CODE: status}
    if status >= 500:
        attributes[error_attributes.ERROR_TYPE] = str(status)
    elif ctx.error is not None and status < 400:
        attributes[error_attributes.ERROR_TYPE] = outcome(ctx)
    return attributes


def sent_status(ctx: RequestContext) -> int:
    """The status the client was sent: once a response's head has gone out (a stream whose client then left is
    booked 499), the head's own status, which is what http.response.status_code means."""
    response = ctx.response
    if ctx.bytes_sent and response is not None and getattr(response, "prepared", False):
        return response.status
    return ctx.status


def outcome(ctx: RequestContext) -> str:
    """One low-cardinality word for how the request ended."""
    if ctx.error is None and ctx.status < 400:
        return "cache_hit" if ctx.cache_status == "hit" else "success"
    code = getattr(ctx.error, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(ctx.error, GatewayError):     # one OpenAI answers without a code (JSON that does not parse)
        return f"http_{ctx.error.status}"
    if ctx.error is not None:
        return type(ctx.error).__name__
    if ctx.status == 499:
        return CLIENT_DISCONNECTED          # the client left: as its CLIENT span's error.type says
    return f"http_{ctx.status}"


def sla_status(ctx: RequestContext) -> str | None:
    """`met` or `missed` (by the routing decision) for a request its plan served: a model or the cache answered
    it, or its models failed; `missed` for one refused because no model meets its route's SLA; None for one
    refused before it reached a model (rate limits, budget) or never routed."""
    if isinstance(ctx.error, NoModelMeetsSla):
        return "missed"
    if ctx.decision is None or not (ctx.attempts or ctx.cache_status == "hit"):
        return None
    return "met" if ctx.decision.sla_met else "missed"


def metric_labels(ctx: RequestContext, tenant_label: str) -> dict[str, Any]:
    """Labels of the gateway's per-request metrics: tenant (bounded), route, model, fallback state."""
    labels: dict[str, Any] = {TENANT: tenant_label, FALLBACK_STATE: ctx.fallback_state}
    if ctx.route_name:
        labels[ROUTE] = ctx.route_name
    if ctx.model_selected:
        labels[MODEL_SELECTED] = ctx.model_selected
    return labels


#: the distinct `model` names a policy model's answers may carry as a metric label; later ones are `other` (a
#: server naming a new model in each answer would otherwise fill the SDK's 2,000 series a metric and send every
#: later series, of any tenant or route, to its overflow)
RESPONSE_MODELS_PER_MODEL = 16
_response_models: dict[str, set[str]] = {}


def response_model_label(selected: str, response_model: str) -> str:
    """The metric label for the `model` an answer of policy model `selected` named: itself for the first
    RESPONSE_MODELS_PER_MODEL distinct ones, then `other` (the span keeps the name whatever it is)."""
    seen = _response_models.setdefault(selected, set())
    if response_model in seen:
        return response_model
    if len(seen) < RESPONSE_MODELS_PER_MODEL:
        seen.add(response_model)
        return response_model
    return "other"


def attempt_metric_labels(ctx: RequestContext, attempt: Attempt, tenant_label: str) -> dict[str, Any]:
    """Labels of the gen_ai.client.* metrics for one attempt, plus tenant, route, model and the request's fallback
    state (recorded once the request has ended: a failed first attempt of a request a fallback answered is
    `fallback`)."""
    model = attempt.model
    labels: dict[str, Any] = {
        gen_ai.GEN_AI_OPERATION_NAME: ctx.operation,
        gen_ai.GEN_AI_PROVIDER_NAME: model.provider,
        gen_ai.GEN_AI_REQUEST_MODEL: model.upstream_model,
        **server_address(model.endpoint),
        TENANT: tenant_label,
        MODEL_SELECTED: model.name,
        FALLBACK_STATE: ctx.fallback_state,
    }
    if attempt.response_model:
        labels[gen_ai.GEN_AI_RESPONSE_MODEL] = response_model_label(model.name, attempt.response_model)
    if ctx.route_name:
        labels[ROUTE] = ctx.route_name
    if attempt.error_type:
        labels[error_attributes.ERROR_TYPE] = attempt.error_type
    return labels


def route_attributes(ctx: RequestContext) -> dict[str, Any]:
    """What the router considered and chose, for the gateway.route span."""
    decision = ctx.decision
    if decision is None:
        return {TENANT: ctx.tenant_name}
    attributes: dict[str, Any] = {
        TENANT: ctx.tenant_name,
        ROUTE: decision.route.name,
        SLA_MET: decision.sla_met,
        "gateway.route.explored": decision.explored,
        "gateway.route.candidates": tuple(candidate.model.name for candidate in decision.candidates),
        "gateway.route.candidates.kept": tuple(c.model.name for c in decision.candidates if c.kept),
        "gateway.route.plan": tuple(model.name for model in decision.plan),
    }
    if decision.plan:
        attributes[MODEL_SELECTED] = decision.plan[0].name
    # the limits the request's x-gateway-* headers tightened the route's SLA to, which sla.met was judged by
    attributes.update((f"{SLA_TIGHTENED}.{name}", value) for name, value in ctx.sla_tightened.items())
    return attributes


def child_attributes(ctx: RequestContext) -> dict[str, Any]:
    """The gateway attributes every child span of the request carries: tenant and route."""
    attributes: dict[str, Any] = {TENANT: ctx.tenant_name}
    if ctx.route_name:
        attributes[ROUTE] = ctx.route_name
    return attributes


def error_type(exc: BaseException) -> str:
    """error.type of an exception: the gateway's short code, else the class name."""
    code = getattr(exc, "reason", None) or getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__qualname__
