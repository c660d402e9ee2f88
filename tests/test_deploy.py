"""deploy/: the image, the Compose stack, its dashboards and the Kubernetes manifests, without a container engine."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import promql_parser
import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

import gateway.telemetry.metrics as metrics_module
from gateway.context import Attempt, Decision, RequestContext, Usage
from gateway.outcomes import Task
from gateway.policy.load import check_policy, load_policy
from gateway.policy.model import Match, Model, Policy, Route, Tenant
from gateway.telemetry import Telemetry, TelemetryConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
K8S = DEPLOY / "k8s"
DASHBOARDS = sorted((COMPOSE_DIR / "grafana" / "dashboards").glob("*.json"))
#: the DCGM exporter's own series (GPU panels), as the energy layer's fixture shows them
DCGM_FIXTURE = REPO / "tests" / "fixtures" / "dcgm_metrics.txt"
#: labels Prometheus itself adds to every scraped series
SCRAPE_LABELS = frozenset({"job", "instance"})
#: how Grafana's built-in interval variables are replaced before a query is parsed
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


# ---------------------------------------------------------------- the metric names the gateway exports

SMALL = Model(name="small", endpoint="http://sim-small:9101/v1", upstream_model="sim-small-1b", size_b=1)
LARGE = Model(name="large", endpoint="http://sim-large:9103/v1", upstream_model="sim-large-70b", size_b=70, tier=3)
ROUTE = Route(name="chat-default", match=Match(models=("auto",)), candidates=("small", "large"), fallback=("large",))
POLICY = Policy(version=1, models={"small": SMALL, "large": LARGE}, routes=(ROUTE,))


def request_context(**fields) -> RequestContext:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return RequestContext(http=make_mocked_request("POST", "/v1/chat/completions"), policy=POLICY,
                          request_id="req-1", tenant=Tenant(name="acme"), body=body, requested_model="auto",
                          stream=True, prompt_tokens=12, **fields)


def record_fallback_request(telemetry: Telemetry) -> None:
    """A streamed request whose first attempt timed out and whose fallback answered and was cached."""
    ctx = request_context()
    telemetry.start_request(ctx, {})
    with telemetry.route_span(ctx):
        ctx.decision = Decision(route=ROUTE, plan=(SMALL, LARGE), sla_met=True)
    with telemetry.cache_span(ctx):
        ctx.cache_status = "miss"
    failed = Attempt(model=SMALL, started_s=time.perf_counter(), queue_result="granted", queued_s=0.02)
    ctx.attempts.append(failed)             # it waited 20 ms for a call slot (routing.queue_timeout_ms)
    telemetry.start_attempt(ctx, failed)
    failed.error_type, failed.status, failed.ended_s = "timeout", 504, time.perf_counter()
    telemetry.end_attempt(ctx, failed)
    answered = Attempt(model=LARGE, started_s=time.perf_counter())
    ctx.attempts.append(answered)
    telemetry.start_attempt(ctx, answered)
    answered.ttft_s, answered.status, answered.ended_s = 0.05, 200, answered.started_s + 0.3
    answered.usage, answered.response_model = Usage(input_tokens=10, output_tokens=20), "sim-large-70b"
    answered.cost_usd = Decimal("0.001")    # the cost counter is per attempt: without it every cost panel reads 0
    answered.energy_j = 12.5                # and so is the energy counter: the answering attempt's GPUs measured
    telemetry.end_attempt(ctx, answered, chunk_gaps_s=[0.01, 0.02])
    ctx.fallback_state, ctx.fallback_reason = "fallback", "timeout"
    ctx.cache_status, ctx.cost_usd, ctx.energy_j, ctx.usage = "stored", Decimal("0.001"), 12.5, answered.usage
    telemetry.finish_request(ctx)


def record_cache_hit(telemetry: Telemetry) -> None:
    """A request answered from the cache, which saved its cost."""
    ctx = request_context(decision=Decision(route=ROUTE, plan=(SMALL,), sla_met=False))
    telemetry.start_request(ctx, {})
    ctx.cache_status, ctx.cache_saved_usd = "hit", Decimal("0.0004")
    telemetry.finish_request(ctx)


def instrument_names() -> set[str]:
    """The OpenTelemetry names of every instrument created in gateway/telemetry/metrics.py (read from its AST)."""
    names = set()
    for node in ast.walk(ast.parse(Path(metrics_module.__file__).read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr.startswith("create_") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                names.add(arg.value)
            elif isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name):
                names.add(getattr(getattr(metrics_module, arg.value.id), arg.attr))
    return names


def series_labels(text: str) -> dict[str, set[str]]:
    """Series name -> its label names, from a Prometheus text exposition, names exactly as Prometheus stores them.

    The # TYPE lines are dropped first: with them the parser renames a counter's samples to `<name>_total`
    even where the exposition (the DCGM exporter's) has no such suffix.
    """
    samples = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(samples):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name the gateway's Prometheus endpoint serves, with its labels, plus the DCGM exporter's."""
    telemetry = Telemetry(TelemetryConfig(prometheus=True))
    try:
        assert telemetry.prometheus_enabled, "opentelemetry-exporter-prometheus is not installed"
        policy = load_policy(Path(__file__).parent / "policies" / "full.yaml")    # models, tenants, budgets
        telemetry.observe_policy(lambda: policy)
        record_fallback_request(telemetry)
        record_cache_hit(telemetry)
        telemetry.record_outcome(Task(route="chat-default", tenant="acme", workflow="support",
                                      cost_usd=Decimal("0.002"), requests=2, outcome="success"))
        gateway_series = series_labels(telemetry.prometheus_text().decode())
    finally:
        telemetry.shutdown(timeout_s=2)
    prefixes = {name: name.replace(".", "_") for name in instrument_names()}
    missing = {name for name, prefix in prefixes.items()
               if not any(series == prefix or series.startswith(prefix + "_") for series in gateway_series)}
    assert not missing, f"instruments not exercised by this test's requests, extend them: {missing}"
    return {**series_labels(DCGM_FIXTURE.read_text()), **gateway_series}


# ---------------------------------------------------------------- dashboards

def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows and their nested panels flattened, row headers dropped)."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def expand(expr: str, dashboard: dict) -> str:
    """The query as Grafana sends it: interval variables as durations, template variables as their values."""
    for name, duration in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, duration)
    variables = dashboard.get("templating", {}).get("list", [])
    for variable in sorted(variables, key=lambda v: -len(v["name"])):
        value = variable.get("allValue") if variable.get("includeAll") else variable["current"]["value"]
        for form in ("${%s}" % variable["name"], "$" + variable["name"]):
            expr = expr.replace(form, str(value))
    return expr


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expanded PromQL) for every target of every panel."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                queries.append((path.name, panel["title"], expand(target["expr"], dashboard)))
    return queries


def selectors_and_groupings(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric, matcher label names)], label names used by by/without/on/ignoring/group_*) of a query."""
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append((node.name, {m.name for m in node.matchers.matchers} - {"__name__"}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or ())

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, grouping


def test_dashboards_are_valid_json_with_datasource_and_targets():
    """Both dashboards load as JSON with distinct uids, and every data panel has a datasource and PromQL targets."""
    assert {path.name for path in DASHBOARDS} == {"executive.json", "operator.json"}
    boards = [json.loads(path.read_text()) for path in DASHBOARDS]
    assert len({board["uid"] for board in boards}) == len(boards)
    for board in boards:
        for panel in panels(board):
            assert panel.get("datasource", {}).get("uid"), f"{board['uid']}: {panel['title']} has no datasource"
            assert panel.get("targets") and all(t.get("expr") for t in panel["targets"]), panel["title"]


def test_dashboards_cover_the_issue_panels():
    """The executive and operator dashboards have a panel for every number the issue asks for."""
    wanted = {
        "executive.json": ["cost per request", "cost per 1k tokens", "cost per successful task", "spend by tenant",
                           "spend by route", "budget", "cache savings", "idle-to-active", "energy per request",
                           "this week vs last week"],
        "operator.json": ["latency by model", "latency by route", "time to first token by model",
                          "time to first token by route", "throughput", "in-flight", "saturation per model",
                          "fallback rate by reason", "cache hit rate", "sla attainment", "error rate",
                          "gpu power", "gpu utilization"],
    }
    for path in DASHBOARDS:
        titles = " | ".join(panel["title"].lower() for panel in panels(json.loads(path.read_text())))
        assert [item for item in wanted[path.name] if item not in titles] == []


def test_dashboard_queries_parse():
    """Every panel query is valid PromQL once Grafana's variables are filled in."""
    queries = dashboard_queries()
    assert len(queries) > 30
    for board, title, expr in queries:
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            pytest.fail(f"{board} / {title}: {exc}\n{expr}")


def test_dashboard_metric_names_are_exported_by_the_gateway(exported):
    """Every metric a panel or a variable queries is one the gateway (or the DCGM exporter) really exports."""
    used = {(board, title, metric) for board, title, expr in dashboard_queries()
            for metric, _ in selectors_and_groupings(expr)[0]}
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable.get("definition", ""))
            if match:
                used.add((path.name, f"${variable['name']}", match[1]))
                assert match[2] in exported.get(match[1], set()), variable["name"]
    unknown = sorted(f"{board} / {title}: {metric}" for board, title, metric in used if metric not in exported)
    assert unknown == [], "not exported:\n" + "\n".join(unknown)


def test_dashboard_label_names_are_exported_by_the_gateway(exported):
    """Every label a query filters or groups on is carried by the series it queries (or added by the scrape)."""
    problems = []
    for board, title, expr in dashboard_queries():
        selectors, grouping = selectors_and_groupings(expr)
        known = set(SCRAPE_LABELS)
        for metric, matched in selectors:
            labels = exported.get(metric, set()) | SCRAPE_LABELS
            known |= labels
            problems += [f"{board} / {title}: {metric} has no label {label}" for label in matched - labels]
        problems += [f"{board} / {title}: no queried series has label {label}" for label in grouping - known]
    assert problems == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_queries_pass_promtool(tmp_path):
    """Prometheus's own parser accepts every dashboard query (each checked as a recording rule)."""
    rules = [{"record": f"dashboard:query_{index}", "expr": expr}
             for index, (_, _, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_dashboards_and_mounts(compose):
    """Grafana provisions the datasource uids the panels use, from the folder Compose mounts the dashboards into."""
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    datasources = load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    uids = {source["uid"] for source in datasources}
    assert {"prometheus", "jaeger"} <= uids
    prometheus = next(source for source in datasources if source["uid"] == "prometheus")
    assert urlsplit(prometheus["url"]).hostname in compose["services"]
    provider = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            assert {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]} <= uids


# ---------------------------------------------------------------- Compose

@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (Debian package docker-compose)")
def test_compose_file_passes_docker_compose_config():
    """docker-compose itself validates the stack (schema, anchors, interpolation)."""
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_are_pinned_and_healthchecked(compose):
    """Every service is present, every image has a precise tag, and the gateway has a /healthz healthcheck."""
    services = compose["services"]
    assert {"gateway", "sim-small", "sim-medium", "sim-large", "redis", "otel-collector", "jaeger",
            "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), f"{name}: {image} is not pinned"
        assert not image.split("@")[0].endswith(":latest"), name
        if "build" in service:
            assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert "/healthz" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert services["gateway"]["read_only"] is True


def test_compose_mounts_exist_and_are_read_only(compose):
    """Bind mounts name repository files and are read-only; named volumes are declared."""
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
                assert mode == ["ro"], f"{name}: {source} should be mounted read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert "./policy:/etc/gateway:ro" in compose["services"]["gateway"]["volumes"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_policy_points_at_the_simulator_services(compose):
    """The compose policy is valid and each model's endpoint is a simulator service serving that upstream model."""
    assert check_policy(COMPOSE_DIR / "policy" / "policy.yaml") == []
    policy = load_policy(COMPOSE_DIR / "policy" / "policy.yaml")
    services = compose["services"]
    for model in policy.models.values():
        endpoint = urlsplit(model.endpoint)
        command = services[endpoint.hostname]["command"]
        assert command[0] == "simulate-backend" and flag(command, "--host") == "0.0.0.0"
        assert (int(flag(command, "--port")), flag(command, "--model")) == (endpoint.port, model.upstream_model)
    environment = services["gateway"]["environment"]
    assert urlsplit(environment["GATEWAY_REDIS_URL"]).hostname == "redis"
    assert urlsplit(environment["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == "otel-collector"


def test_otel_collector_pipelines(compose):
    """The collector takes OTLP over gRPC and HTTP, sends traces to Jaeger and metrics to a Prometheus endpoint."""
    config = load_yaml(COMPOSE_DIR / "otel-collector.yaml")
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/jaeger"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    for pipeline in pipelines.values():
        assert pipeline["receivers"] == ["otlp"]
        assert set(pipeline["processors"]) <= set(config["processors"])
        assert set(pipeline["exporters"]) <= set(config["exporters"])
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    assert config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in compose["services"]
    mounts = [v.split(":") for v in compose["services"]["otel-collector"]["volumes"]]
    assert ["./otel-collector.yaml", "/etc/otelcol-contrib/config.yaml", "ro"] in mounts


def test_prometheus_scrapes_gateway_and_collector():
    """Prometheus scrapes the gateway's /metrics on its metrics port (the one its command names, which is not
    published) and the collector's Prometheus exporter port."""
    config = load_yaml(COMPOSE_DIR / "prometheus.yaml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway_targets = jobs["gateway"]["static_configs"][0]["targets"]
    gateway = load_yaml(COMPOSE_DIR / "docker-compose.yaml")["services"]["gateway"]
    metrics_port = flag(gateway["command"], "--metrics-port")
    assert gateway_targets == [f"gateway:{metrics_port}"] and metrics_port != flag(gateway["command"], "--port")
    assert jobs["gateway"].get("metrics_path", "/metrics") == "/metrics"
    assert not any(str(published).endswith(f":{metrics_port}") for published in gateway.get("ports", ()))
    exporter_port = load_yaml(COMPOSE_DIR / "otel-collector.yaml")["exporters"]["prometheus"]["endpoint"].split(":")[1]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [f"otel-collector:{exporter_port}"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_prometheus_config_passes_promtool():
    """promtool accepts the Compose stack's Prometheus configuration."""
    result = subprocess.run(["promtool", "check", "config", str(COMPOSE_DIR / "prometheus.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_is_multi_stage_pinned_and_non_root():
    """Pinned base images, a builder stage, a non-root USER, a /healthz HEALTHCHECK, no ADD of URLs, port 8080."""
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert len(bases) >= 2 and any("--from=builder" in args for op, args in instructions if op == "COPY")
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", base), f"{base} is not pinned"
    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [args for op, args in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" and "/healthz" in args for op, args in final_stage)
    assert not any(op == "ADD" and re.search(r"https?://", args) for op, args in instructions)
    assert ("EXPOSE", "8080") in final_stage
    assert any(op == "CMD" and "/etc/gateway/policy.yaml" in args for op, args in final_stage)


def test_dockerfile_copies_only_existing_sources():
    """Every COPY from the build context names a path that exists at the repository root."""
    for op, args in dockerfile_instructions():
        if op == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} is missing"


# ---------------------------------------------------------------- Kubernetes

def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


def manifests() -> list[dict]:
    """The resources kustomization.yaml lists, plus the policy ConfigMap its generator makes."""
    documents = [doc for name in kustomization()["resources"] for doc in load_yaml_all(K8S / name)]
    for generator in kustomization()["configMapGenerator"]:
        data = {Path(name).name: (K8S / name).read_text() for name in generator["files"]}
        documents.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                          "data": data})
    return documents


def by_kind(kind: str) -> dict:
    return next(doc for doc in manifests() if doc["kind"] == kind)


def test_kustomization_files_exist_and_leave_the_secret_out():
    """Every resource and generator file of the kustomization exists; the example Secret is not applied."""
    config = kustomization()
    names = config["resources"] + [f for g in config["configMapGenerator"] for f in g["files"]]
    assert all((K8S / name).is_file() for name in names)
    assert "secret.example.yaml" not in config["resources"] and (K8S / "secret.example.yaml").is_file()
    assert {doc["kind"] for doc in manifests()} == {"Namespace", "Deployment", "Service", "PodDisruptionBudget",
                                                     "HorizontalPodAutoscaler", "ConfigMap"}
    assert check_policy(K8S / "policy.yaml") == []


def test_k8s_manifests_match_the_api_schemas():
    """The manifests, the generated ConfigMap and the example Secrets pass the Kubernetes API schemas, strictly."""
    version = kubernetes_validate.latest_version()
    for doc in manifests() + load_yaml_all(K8S / "secret.example.yaml"):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_build_renders_valid_manifests():
    """`kubectl kustomize` renders the directory; the output is namespaced, schema-valid and carries the policy."""
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in rendered:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"]
    config_map = next(doc for doc in rendered if doc["kind"] == "ConfigMap")
    assert config_map["metadata"]["name"] == "gateway-policy"
    assert config_map["data"]["policy.yaml"] == (K8S / "policy.yaml").read_text()


def test_deployment_probes_security_and_configuration():
    """Probes, hardening, the policy volume, Secret references and OTEL settings of the gateway Deployment."""
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    policy_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/gateway")
    assert policy_mount["readOnly"] and "subPath" not in policy_mount
    volume = next(v for v in pod["volumes"] if v["name"] == policy_mount["name"])
    assert volume["configMap"]["name"] == kustomization()["configMapGenerator"][0]["name"]
    assert "/etc/gateway/policy.yaml" in container["args"]
    secrets = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in load_yaml_all(K8S / "secret.example.yaml")}
    env = {item["name"]: item for item in container["env"]}
    for name in ("GATEWAY_REDIS_URL", "GATEWAY_ADMIN_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]
    assert all(source["secretRef"]["name"] in secrets for source in container["envFrom"])
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"} <= set(env)
    assert "service.instance.id=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]


def test_service_pdb_and_hpa_target_the_gateway_pods():
    """The Service, PodDisruptionBudget and autoscaling/v2 CPU autoscaler all select or target the gateway."""
    deployment = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert all(port["targetPort"] in port_names for port in service["spec"]["ports"])
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] > by_kind("PodDisruptionBudget")["spec"]["minAvailable"]


# ---------------------------------------------------------------- where the gateway listens, is probed and scraped

def url_port(text: str) -> int:
    """The port of the one http://host:port URL in `text` (a healthcheck command)."""
    [port] = re.findall(r"https?://[\w.-]+:(\d+)/", text)
    return int(port)


def test_compose_gateway_listens_where_it_is_published_probed_and_scraped(compose):
    """The Compose gateway binds all interfaces on the port its healthcheck probes and Compose publishes, and its
    metrics port is the one Prometheus scrapes (a port changed in one place only leaves the stack unhealthy or the
    dashboards empty)."""
    gateway = compose["services"]["gateway"]
    port = int(flag(gateway["command"], "--port"))
    assert flag(gateway["command"], "--host") == "0.0.0.0"
    assert url_port(" ".join(gateway["healthcheck"]["test"])) == port
    assert [int(str(mapping).split(":")[-1]) for mapping in gateway["ports"]] == [port]
    jobs = {job["job_name"]: job for job in load_yaml(COMPOSE_DIR / "prometheus.yaml")["scrape_configs"]}
    metrics_port = int(flag(gateway["command"], "--metrics-port"))
    assert jobs["gateway"]["static_configs"][0]["targets"] == [f"gateway:{metrics_port}"]


def test_compose_simulator_healthchecks_probe_their_own_port(compose):
    """Each simulator's healthcheck asks the port that simulator serves, so the gateway (which waits for them
    to be healthy) starts."""
    simulators = {name: service for name, service in compose["services"].items()
                  if service.get("command", [""])[0] == "simulate-backend"}
    assert len(simulators) == 3
    for name, service in simulators.items():
        assert url_port(" ".join(service["healthcheck"]["test"])) == int(flag(service["command"], "--port")), name


def test_image_listens_on_the_port_it_exposes_and_probes():
    """The image's default command binds all interfaces on the port it EXPOSEs and its HEALTHCHECK probes."""
    final_stage = dockerfile_instructions()[max(i for i, (op, _) in enumerate(dockerfile_instructions())
                                                if op == "FROM"):]
    command = json.loads(next(args for op, args in final_stage if op == "CMD"))
    port = int(flag(command, "--port"))
    assert flag(command, "--host") == "0.0.0.0"
    assert ("EXPOSE", str(port)) in final_stage
    assert url_port(next(args for op, args in final_stage if op == "HEALTHCHECK")) == port


def test_deployment_listens_on_the_port_its_probes_service_and_scrape_use():
    """The pod's gateway binds all interfaces on the container port the probes and the Service name, and serves
    /metrics on a port of its own, which the Prometheus scrape annotation names and the Service does not expose
    (its series name every tenant, its spend and budgets); the startup and liveness probes ask /healthz."""
    template = by_kind("Deployment")["spec"]["template"]
    container = template["spec"]["containers"][0]
    port = int(flag(container["args"], "--port"))
    metrics_port = int(flag(container["args"], "--metrics-port"))
    assert flag(container["args"], "--host") == "0.0.0.0"
    ports = {item["name"]: item["containerPort"] for item in container["ports"]}
    assert ports == {"http": port, "metrics": metrics_port} and metrics_port != port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", port), probe
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    service_ports = by_kind("Service")["spec"]["ports"]
    assert [item["targetPort"] for item in service_ports] == ["http"]


def test_deployment_is_hardened_and_sized():
    """The pod runs under the runtime's seccomp profile without a service-account token, and the container
    declares CPU and memory requests and limits (the autoscaler and the scheduler need them)."""
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    seccomp = container["securityContext"].get("seccompProfile") or pod["securityContext"].get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


def test_rollout_keeps_every_serving_pod_until_its_replacement_is_ready():
    """A rolling update adds a pod before it removes one (maxUnavailable 0, a surge of at least 1), so a policy
    or image change never drops serving capacity below what the autoscaler chose."""
    strategy = by_kind("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def telemetry_settings(environment: dict[str, str]) -> TelemetryConfig:
    """What the gateway's telemetry layer makes of a deployment's environment variables."""
    return TelemetryConfig.from_env(environ={name: str(value) for name, value in environment.items()})


def collector_port(protocol: str) -> int:
    """The port the Compose collector receives OTLP on over `protocol` (grpc or http/protobuf)."""
    protocols = load_yaml(COMPOSE_DIR / "otel-collector.yaml")["receivers"]["otlp"]["protocols"]
    return int(protocols["grpc" if protocol == "grpc" else "http"]["endpoint"].rsplit(":", 1)[1])


def test_gateway_telemetry_reaches_the_collector_and_serves_metrics(compose):
    """In Compose and in Kubernetes the gateway serves /metrics (Prometheus scrapes it) and exports traces and
    metrics over OTLP to the collector port that speaks the configured protocol (gRPC on 4317, not 4318)."""
    compose_env = compose["services"]["gateway"]["environment"]
    container = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    k8s_env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    for where, environment in (("compose", compose_env), ("k8s", k8s_env)):
        settings = telemetry_settings(environment)
        assert settings.prometheus, where
        for export in (settings.traces, settings.metrics):
            assert export is not None and urlsplit(export.endpoint).port == collector_port(export.protocol), where


def longest_look_back_s(expr: str) -> int:
    """How far back a query reads: its longest range plus that selector's offset, in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
    seconds = [int(amount) * units[unit] + (int(off) * units[off_unit] if off else 0)
               for amount, unit, off, off_unit in re.findall(r"\[(\d+)([smhdwy])\](?:\s+offset\s+(\d+)([smhdwy]))?",
                                                              expr)]
    return max(seconds, default=0)


def test_prometheus_keeps_the_history_the_dashboards_read(compose):
    """Prometheus's retention covers the longest look-back of any panel (last 7 days against the 7 before:
    14 days), so the week-over-week panels are not empty or wrong for want of data."""
    command = compose["services"]["prometheus"]["command"]
    [retention] = [item.split("=", 1)[1] for item in command if item.startswith("--storage.tsdb.retention.time=")]
    assert re.fullmatch(r"\d+d", retention), retention
    needed_s = max(longest_look_back_s(expr) for _, _, expr in dashboard_queries())
    assert needed_s >= 14 * 86400 and int(retention[:-1]) * 86400 >= needed_s


def test_grafana_datasources_reach_their_services_at_their_ports(compose):
    """Grafana's Prometheus and Jaeger datasources name the port each service listens on, and Prometheus's
    datasource declares the scrape interval, so $__rate_interval spans at least four scrapes."""
    datasources = {source["uid"]: source for source in load_yaml(
        COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "datasources.yaml")["datasources"]}
    for uid in ("prometheus", "jaeger"):
        url = urlsplit(datasources[uid]["url"])
        published = [int(str(mapping).split(":")[-1]) for mapping in compose["services"][url.hostname]["ports"]]
        assert url.port in published, uid
    scrape_interval = load_yaml(COMPOSE_DIR / "prometheus.yaml")["global"]["scrape_interval"]
    assert datasources["prometheus"]["jsonData"]["timeInterval"] == scrape_interval


#: (a pattern of a panel's title, or of its queries, the Grafana unit its figures need), first match wins
PANEL_UNITS = (
    ("title", r"vs the 7 before|\brate\b|attainment|share|used|utilization", "percentunit"),
    ("title", r"^(cost|spend|cache savings)", "currencyUSD"),
    ("title", r"^energy", "joule"),
    ("title", r"^gpu power", "watt"),
    ("title", r"requests per second", "reqps"),
    ("query", r"^histogram_quantile\(.*_seconds_bucket", "s"),
)


def test_panel_units_match_what_their_queries_return():
    """Latencies are shown in seconds, money in USD, shares in percent of 1, energy in joules and power in
    watts, so Grafana labels each figure with what it really is (a latency in `ms` reads 1000 times too small)."""
    checked = 0
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            shown = {"title": [panel["title"].lower()], "query": [target["expr"] for target in panel["targets"]]}
            wanted = next((unit for where, pattern, unit in PANEL_UNITS
                           if all(re.search(pattern, text) for text in shown[where])), None)
            if wanted:
                checked += 1
                assert panel["fieldConfig"]["defaults"].get("unit") == wanted, f"{path.name}: {panel['title']}"
    assert checked >= 30
