"""The aiohttp application: routes, the outermost error middleware, shared services."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from gateway import admin, input_tokens, stored_responses
from gateway.context import RequestContext
from gateway.cost import plain_usd
from gateway.errors import ClientError, ExpectationFailed, GatewayError, NotFound, PermissionDenied
from gateway.outcomes import ANONYMOUS
from gateway.plain_calls import caller, traced
from gateway.responses import error_response, json_response, request_id
from gateway.runtime import PolicyHolder
from gateway.stages.parse import expects_continue, parse_json_object, read_body
from gateway.services import SERVICES, Services, services_ctx
from gateway.telemetry.peers import PEERS, Peers

log = logging.getLogger("gateway")

HOLDER = web.AppKey("holder", PolicyHolder)
#: set on the API's app when `gateway run --metrics-port` serves /metrics on a port of its own
METRICS_ELSEWHERE = web.AppKey("metrics_elsewhere", bool)
#: the metrics port's app: the API's app, whose services it shows
MAIN = web.AppKey("main", web.Application)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The only place that catches everything: every failure leaves in OpenAI's error shape; every answer carries
    an x-request-id (the SDKs' `_request_id`), the model list and health checks included."""
    try:
        response = await handler(request)
        if not response.prepared and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = request_id(request)
        return response
    except GatewayError as exc:
        return error_response(exc, request_id=request_id(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = NotFound(f"no such endpoint: {request.method} {request.path}", code="not_found") \
            if exc.status == 404 else ClientError(exc.reason, code=f"http_{exc.status}")
        error.status = exc.status
        if (allowed := exc.headers.get("Allow")) is not None:     # a 405 names the methods taken (RFC 9110)
            error.message = f"{request.method} is not allowed on {request.path}; use {allowed}"
            error.headers = {"Allow": allowed}
        return error_response(error, request_id=request_id(request))
    except Exception:
        rid = request_id(request)
        log.exception("unhandled error serving %s %s (request %s)", request.method, request.path, rid)
        return error_response(GatewayError("internal error"), request_id=rid)


async def continue_when_read(request: web.Request) -> web.Response | None:
    """The `Expect` handler of the routes that read a body: `100 Continue` is sent when the body is first read
    (`read_body`), not as the head arrives (aiohttp's own), so a request refused on its head (401 for its key, 413
    for its Content-Length) is refused before the client uploads its body; another expectation is a 417 in
    OpenAI's shape (this answer bypasses the middlewares)."""
    if request.version == HttpVersion11 and not expects_continue(request):
        expect = request.headers.get(hdrs.EXPECT, "")
        return error_response(ExpectationFailed(f"unsupported Expect header {expect!r}: only 100-continue is "
                                                f"taken"), request_id=request_id(request))
    return None


async def close_on_unread_body(request: web.Request, response: web.StreamResponse) -> None:
    """An answer made before the whole of a body was read closes the connection (`Connection: close`) instead of
    reading on for the rest, when that body has a Content-Encoding or was never asked for (`Expect: 100-continue`
    answered with a refusal). aiohttp decodes a body as it reads it, on the event loop: a few MB of gzip refused
    at once (401, 413) were inflated to GBs after the answer (its lingering read, up to 10 s), stalling every
    other request meanwhile, and a body that did not decode was read on into its error again, logged as an
    unhandled exception. A client told no `100 Continue` sends no body: the connection holds nothing more to read."""
    if not request.content.is_eof() and (hdrs.CONTENT_ENCODING in request.headers or expects_continue(request)):
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"     # its headers are made before this hook runs
        if (stop := getattr(request.protocol, "stop_reading_after_answer", None)) is not None:
            stop()


#: the endpoint kinds and their paths, after `/v1/` (or Azure's `/openai/deployments/{deployment}/`)
ENDPOINT_PATHS = {"chat": "chat/completions", "completions": "completions", "embeddings": "embeddings",
                  "responses": "responses"}


def openai_handler(endpoint: str):
    """The handler of one OpenAI endpoint: a context through the pipeline."""
    async def handle(request: web.Request) -> web.StreamResponse:
        services: Services = request.app[SERVICES]
        runtime = services.holder.current
        ctx = RequestContext(http=request, policy=runtime.policy, runtime=runtime,
                             request_id=request_id(request), endpoint=endpoint)
        services.in_flight[id(ctx)] = (ctx, asyncio.current_task())
        try:
            return await services.pipeline.run(ctx)
        finally:
            del services.in_flight[id(ctx)]
    return handle


@traced
async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the aliases a client may ask for (those its tenant may use)."""
    runtime = request.app[SERVICES].holder.current
    tenant = caller(request)
    aliases = [a for a in runtime.policy.aliases() if _may_use(runtime, tenant, a)]
    return json_response({"object": "list", "data": [
        {"id": alias, "object": "model", "created": 0, "owned_by": "inference-gateway"} for alias in aliases]})


@traced
async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: a model name the caller may ask for (a route's alias, or a name its pattern
    matches), in `GET /v1/models`' shape; 404 otherwise."""
    runtime = request.app[SERVICES].holder.current
    tenant = caller(request)
    alias = request.match_info["model"]
    if not runtime.routes.routes_for(alias) or not _may_use(runtime, tenant, alias):
        raise NotFound(f"the model '{alias}' does not exist or you do not have access to it", param="model")
    return json_response({"id": alias, "object": "model", "created": 0, "owned_by": "inference-gateway"})


def _may_use(runtime, tenant, alias: str) -> bool:
    try:
        runtime.identity.check_allowed(tenant, None, alias)
    except PermissionDenied:
        return False
    return True


@traced
async def report_outcome(request: web.Request) -> web.Response:
    """POST /v1/outcomes: how a task (or one request) went, for cost per successful task.

    With Redis, any replica answers for a task any other booked; while Redis is down, 503 store_unavailable."""
    services: Services = request.app[SERVICES]
    runtime = services.holder.current
    tenant = caller(request)
    server = runtime.policy.server
    body = parse_json_object(await read_body(request, server.max_body_bytes, server.client_timeout_s))
    await _priced(services, tenant.name if tenant else ANONYMOUS)
    task = await services.outcomes.report(body, tenant=tenant.name if tenant else None,
                                          pricing_s=services.pricing_s)
    record = {"task_id": body.get("task_id"), "request_id": body.get("request_id"),
              "outcome": task.outcome, "route": task.route, "tenant": task.tenant,
              "workflow": task.workflow, "cost_usd": plain_usd(task.cost_usd)}
    services.recorder.outcome(record)
    services.telemetry.record_outcome(task)
    return json_response({"object": "outcome", **record})


async def _priced(services: Services, tenant_name: str) -> None:
    """Wait for the caller's answered requests whose measured joules are still coming in this process (at most
    `services.pricing_s`): a report sent as an answer arrives then finds its request booked, and at its whole cost.
    (A shared book waits for those of other processes itself.)"""
    if pricing := services.pricing.get(tenant_name):
        await asyncio.wait(set(pricing), timeout=services.pricing_s)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus exposition, when enabled (policy telemetry.prometheus or GATEWAY_PROMETHEUS=1);
    on the metrics port alone when there is one (`gateway run --metrics-port`)."""
    if request.app.get(METRICS_ELSEWHERE):
        raise NotFound("/metrics is served on the gateway's metrics port (gateway run --metrics-port), not here",
                       code="not_found")
    return await exposition(request.app, request)


async def metrics_on_own_port(request: web.Request) -> web.Response:
    """GET /metrics on the metrics port: the API's exposition."""
    return await exposition(request.app[MAIN], request)


def metrics_app(main: web.Application) -> web.Application:
    """The app of the metrics port (`gateway run --metrics-port`): GET /metrics alone, showing `main`'s services,
    so a port kept off the Service and the ingress carries every tenant's names, spend and budgets."""
    app = web.Application(middlewares=[errors_middleware])
    app[MAIN] = main
    app.router.add_get("/metrics", metrics_on_own_port)
    return app


async def exposition(app: web.Application, request: web.Request) -> web.Response:
    """The Prometheus exposition of `app`'s services (every worker's, with `--workers N`)."""
    services: Services = app[SERVICES]
    telemetry = services.telemetry
    runtime = services.holder.current
    if runtime.policy.server.metrics_admin_only:     # each tenant's names, spend, budgets and workflows
        runtime.admin.check(request.headers)
    if not telemetry.prometheus_enabled:
        if not telemetry.enabled:       # the switches below may well be set: name the one that overrides them
            raise NotFound("the Prometheus endpoint is off: OTEL_SDK_DISABLED=true turns all telemetry off, "
                           "/metrics included", code="not_found")
        raise NotFound("the Prometheus endpoint is off: set telemetry.prometheus: true, GATEWAY_PROMETHEUS=1 or "
                       "OTEL_METRICS_EXPORTER=prometheus", code="not_found")
    # rendered in a thread: tens of thousands of series take a second or more to write out, which on the event loop
    # would hold every request (and time healthy models out); the metrics are made to be collected from threads
    body = await asyncio.to_thread(telemetry.prometheus_text)
    peers = app.get(PEERS)
    if peers is not None:               # one of `gateway run --workers N` (with Prometheus on): every worker's series
        body = await peers.gather(body)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: a policy is loaded and the gateway is not draining."""
    services: Services = request.app[SERVICES]
    if services.draining:
        return json_response({"status": "draining"}, status=503)
    return json_response({"status": "ready", "policy_sha256": services.holder.current.policy.content_sha256})


def build_app(holder: PolicyHolder, *, environ=None, peers: Peers | None = None,
              worker: admin.Worker | None = None) -> web.Application:
    """The gateway application for one policy holder; `peers`: it is a worker of several (`Peers.metrics`: with
    Prometheus on); `worker`: which one (its admin answers say so)."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=1024 ** 3)
    app[HOLDER] = holder
    if worker is not None:
        app[admin.WORKER] = worker
    app.cleanup_ctx.append(services_ctx(holder, environ))
    if peers is not None:
        app[PEERS] = peers
        if peers.metrics:
            app.cleanup_ctx.append(peers.serving(lambda: app[SERVICES].telemetry.prometheus_text()))
    app.on_shutdown.append(_start_draining)
    app.on_response_prepare.append(close_on_unread_body)
    router = app.router
    for endpoint, path in ENDPOINT_PATHS.items():
        router.add_post(f"/v1/{path}", openai_handler(endpoint), expect_handler=continue_when_read)
        router.add_post(f"/openai/v1/{path}", openai_handler(endpoint),     # Azure OpenAI's v1 API
                        expect_handler=continue_when_read)
        # Azure OpenAI's paths (the AzureOpenAI SDK client): the deployment names the model; api-version is ignored
        router.add_post(f"/openai/deployments/{{deployment}}/{path}", openai_handler(endpoint),
                        expect_handler=continue_when_read)
    # AzureOpenAI's responses.create() posts to /openai/responses (no deployment in the path: the body's model)
    router.add_post("/openai/responses", openai_handler("responses"), expect_handler=continue_when_read)
    for prefix in ("/v1", "/openai", "/openai/v1"):     # AzureOpenAI's models.list() asks /openai/models
        router.add_get(f"{prefix}/models", list_models)
        router.add_get(f"{prefix}/models/{{model}}", retrieve_model)
        for action, (method, suffix) in stored_responses.ACTIONS.items():
            router.add_route(method, f"{prefix}/responses/{{response_id}}{suffix}",
                             stored_responses.stored_response_handler(action))
        router.add_post(f"{prefix}/responses/input_tokens", input_tokens.count_input_tokens,
                        expect_handler=continue_when_read)
    router.add_post("/v1/outcomes", report_outcome, expect_handler=continue_when_read)
    router.add_get("/healthz", healthz)
    router.add_get("/readyz", readyz)
    router.add_get("/metrics", metrics)
    admin.add_routes(app)
    return app


async def _start_draining(app: web.Application) -> None:
    app[SERVICES].draining = True
