"""Identity: API keys to tenants, allow lists, the admin token, and `gateway keys`."""

from __future__ import annotations

import hmac
import io

import pytest
from multidict import CIMultiDict

from gateway.errors import AuthenticationFailed, PermissionDenied, PolicyError
from gateway.policy.model import Match, Model, Policy, Route, Server, Tenant
from gateway.tenancy import identity as identity_module
from gateway.tenancy import keys
from gateway.tenancy.identity import AdminAuth, Identity, sha256_hex, tenant_keys

ACME_KEY = "gw-acme-secret-key"
BETA_KEY = "gw-beta-secret-key"
ADMIN_TOKEN = "admin-secret-token"


def make_policy(*tenants: Tenant, server: Server | None = None) -> Policy:
    """A one-model policy with the given tenants."""
    model = Model("small", "http://127.0.0.1:1/v1", "sim-small")
    route = Route("chat-default", Match(), ("small",))
    return Policy(1, {"small": model}, (route,), {t.name: t for t in tenants},
                  server=server or Server())


ACME = Tenant("acme", keys_sha256=(sha256_hex(ACME_KEY),))
BETA = Tenant("beta", keys_sha256=(sha256_hex(BETA_KEY).upper(),), routes=("chat-default",),
              models=("gpt-4o*", "auto"))


@pytest.fixture
def identity() -> Identity:
    """An identity for a policy with tenants acme and beta."""
    return Identity(make_policy(ACME, BETA))


def test_bearer_and_api_key_headers_identify_tenants(identity):
    """A key sent as a Bearer token or as `api-key` (any header case) finds its tenant."""
    assert identity.identify({"authorization": f"Bearer {ACME_KEY}"}) is ACME
    assert identity.identify(CIMultiDict({"API-Key": BETA_KEY})) is BETA
    assert identity.identify({"Authorization": f"bearer  {BETA_KEY} "}) is BETA
    assert not identity.open


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer gw-unknown-key-12345"}, {"api-key": "gw-unknown-key-12345"}])
def test_unknown_key_is_401_without_echo(identity, headers):
    """An unknown key is refused with 401 and the message never repeats the key."""
    with pytest.raises(AuthenticationFailed) as caught:
        identity.identify(headers)
    assert caught.value.status == 401
    assert "unknown-key" not in caught.value.message and "12345" not in str(caught.value.body())


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}])
def test_missing_key_is_401(identity, headers):
    """No usable key at all is a 401 that says how to send one."""
    with pytest.raises(AuthenticationFailed, match="Missing API key"):
        identity.identify(headers)


def test_no_tenants_runs_open():
    """With no tenants the gateway runs open: everyone is anonymous, no key needed."""
    identity = Identity(make_policy())
    assert identity.open
    assert identity.identify({}) is None
    assert identity.identify({"Authorization": "Bearer anything"}) is None


def test_same_key_in_two_tenants_is_a_policy_error():
    """A key hash shared by two tenants is rejected when the identity is built."""
    twin = Tenant("twin", keys_sha256=(sha256_hex(ACME_KEY),))
    with pytest.raises(PolicyError, match=r"tenants\.twin\.keys_sha256\[0\].*'acme'"):
        Identity(make_policy(ACME, twin))


def test_allow_lists(identity):
    """Routes and model aliases outside a tenant's allow lists are 403; empty lists allow all."""
    identity.check_allowed(BETA, "chat-default", "gpt-4o-mini")
    identity.check_allowed(BETA, alias="auto")
    identity.check_allowed(ACME, "anything", "any-model")
    identity.check_allowed(None, "anything", "any-model")
    with pytest.raises(PermissionDenied, match="route 'embeddings'") as caught:
        identity.check_allowed(BETA, "embeddings")
    assert caught.value.status == 403
    with pytest.raises(PermissionDenied, match="model 'text-embedding-3-small'"):
        identity.check_allowed(BETA, alias="text-embedding-3-small")


def test_an_alias_routed_only_for_other_tenants_is_not_offered():
    """A model alias whose only route takes other tenants (`match.tenants`) is not one this tenant may use, so
    GET /v1/models does not list another customer's private models to it."""
    model = Model("small", "http://127.0.0.1:1/v1", "sim-small")
    private = Route("beta-private", Match(models=("private-*",), tenants=("beta",)), ("small",))
    beta = Tenant("beta", keys_sha256=(sha256_hex(BETA_KEY),))
    identity = Identity(Policy(1, {"small": model}, (private,), {"acme": ACME, "beta": beta}))
    identity.check_allowed(beta, alias="private-llm")
    with pytest.raises(PermissionDenied, match="model 'private-llm'"):
        identity.check_allowed(ACME, alias="private-llm")


def test_admin_token_from_environment():
    """The admin token named by admin_token_env opens admin endpoints; others get 401."""
    admin = AdminAuth(Server(), {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
    admin.check({"Authorization": f"Bearer {ADMIN_TOKEN}"})
    admin.check({"x-admin-token": ADMIN_TOKEN})
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, {"x-admin-token": "nope"}):
        with pytest.raises(AuthenticationFailed):
            admin.check(headers)


def test_admin_token_hash_from_policy_wins_over_environment():
    """A policy's admin_token_sha256 is the admin token; the environment variable is then ignored."""
    admin = AdminAuth(Server(admin_token_sha256=sha256_hex(ADMIN_TOKEN).upper()),
                      {"GATEWAY_ADMIN_TOKEN": "other"})
    admin.check({"x-admin-token": ADMIN_TOKEN})
    with pytest.raises(AuthenticationFailed):
        admin.check({"x-admin-token": "other"})


def test_tenant_key_is_never_an_admin_token():
    """A tenant key is refused as admin token, and configuring it as one fails at start-up."""
    policy = make_policy(ACME)
    admin = AdminAuth(policy.server, {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
                      tenant_keys=tenant_keys(policy), source=policy.source)
    with pytest.raises(AuthenticationFailed):
        admin.check({"Authorization": f"Bearer {ACME_KEY}"})
    with pytest.raises(PolicyError) as refused:
        AdminAuth(policy.server, {"GATEWAY_ADMIN_TOKEN": ACME_KEY}, tenant_keys=tenant_keys(policy),
                  source="policy.yaml")
    # the problem names the file, the tenant's keys and where the token came from (the environment, not the file)
    assert str(refused.value.problems[0]) == (
        "policy.yaml: tenants.acme.keys_sha256: the admin token in $GATEWAY_ADMIN_TOKEN (server.admin_token_env) "
        "is also this tenant's API key (tenant keys are never accepted as the admin's)")


def test_admin_disabled_without_token():
    """With no admin token configured every admin call is 403 'admin token not configured'."""
    admin = AdminAuth(Server(admin_token_env="NOT_SET_ANYWHERE"), {"GATEWAY_ADMIN_TOKEN": "x"})
    assert not admin.configured
    with pytest.raises(PermissionDenied, match="admin token not configured"):
        admin.check({"x-admin-token": "x"})


def test_comparisons_are_constant_time(identity, monkeypatch):
    """Key and admin token checks go through hmac.compare_digest."""
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(identity_module.hmac, "compare_digest", recording)
    identity.identify({"api-key": ACME_KEY})
    AdminAuth(Server(), {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}).check({"x-admin-token": ADMIN_TOKEN})
    assert compared == [(sha256_hex(ACME_KEY),) * 2, (sha256_hex(ADMIN_TOKEN),) * 2]


def test_new_key_is_random_and_hashed():
    """Minted keys carry the gw- prefix, differ every time, and come with their SHA-256."""
    (first, first_hash), (second, _) = keys.new_key(), keys.new_key()
    assert first.startswith("gw-") and len(first) > 40 and first != second
    assert first_hash == sha256_hex(first)


def test_keys_new_prints_key_and_yaml_line(capsys):
    """`gateway keys new --tenant` prints a key and the keys_sha256 line that makes it work."""
    assert keys.main(["new", "--tenant", "acme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key = lines[1].strip()
    yaml_line = lines[3].strip()
    assert yaml_line == f'keys_sha256: ["{sha256_hex(key)}"]'
    tenant = Tenant("acme", keys_sha256=(sha256_hex(key),))
    assert Identity(make_policy(tenant)).identify({"api-key": key}) is tenant



@pytest.mark.parametrize(("name", "says"), [("a{b}", "must not contain '{' or '}'"), ("", "must not be empty"),
                                            ("team\nb", "control characters")])
def test_keys_new_refuses_a_tenant_name_the_policy_would(capsys, name, says):
    """`gateway keys new --tenant` with a name the policy refuses exits 2 saying why, and mints no key (a line
    pasted from it would fail `policy check`)."""
    assert keys.main(["new", "--tenant", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and says in captured.err

def test_keys_hash_reads_stdin(capsys, monkeypatch):
    """`gateway keys hash` prints the SHA-256 of the secret on stdin, and fails on empty input."""
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ADMIN_TOKEN}\n"))
    assert keys.main(["hash"]) == 0
    assert capsys.readouterr().out.strip() == sha256_hex(ADMIN_TOKEN)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert keys.main(["hash"]) == 2
