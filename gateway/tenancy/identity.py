"""Who is calling: API key -> tenant (keys stored as SHA-256 hashes), and the admin token.

With no tenants in the policy the gateway runs open: every caller is
anonymous and `identify` returns None. An admin token is never a tenant
key; with no admin token configured the admin endpoints answer 403.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from fnmatch import fnmatchcase

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import AuthenticationFailed, PermissionDenied, PolicyError, PolicyProblem
from gateway.policy.model import Policy, Server, Tenant

Headers = Mapping[str, str]


def sha256_hex(secret: str) -> str:
    """The hex SHA-256 of a key or token, as policies store it (bytes that are not UTF-8, as aiohttp hands
    them on, hash as they came: such a key matches nothing, a 401)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def presented_key(headers: Headers) -> str | None:
    """The key in `Authorization: Bearer <key>` or `api-key: <key>`, if any."""
    if not isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
        headers = CIMultiDict(headers)
    scheme, _, credentials = (headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return (headers.get("api-key") or "").strip() or None


class Identity:
    """Maps API keys to tenants for one policy; built once per (re)load."""

    def __init__(self, policy: Policy) -> None:
        self.tenants_by_hash: dict[str, Tenant] = {}
        problems = []
        for tenant in policy.tenants.values():
            for index, key_hash in enumerate(tenant.keys_sha256):
                owner = self.tenants_by_hash.setdefault(key_hash.lower(), tenant)
                if owner is not tenant:
                    problems.append(PolicyProblem(
                        policy.source, None, f"tenants.{tenant.name}.keys_sha256[{index}]",
                        f"this key hash is also a key of tenant {owner.name!r}"))
        if problems:
            raise PolicyError(problems)
        self.open = not policy.tenants
        self.routes = policy.routes

    def identify(self, headers: Headers) -> Tenant | None:
        """The calling tenant; None when the gateway runs open. Raises AuthenticationFailed."""
        if self.open:
            return None
        key = presented_key(headers)
        if key is None:
            raise AuthenticationFailed(
                "Missing API key: send it as `Authorization: Bearer <key>` or `api-key: <key>`.")
        digest = sha256_hex(key)
        tenant = self.tenants_by_hash.get(digest)
        if tenant is None or not any(hmac.compare_digest(digest, h.lower())
                                     for h in tenant.keys_sha256):
            raise AuthenticationFailed("Incorrect API key provided.")
        return tenant

    def check_allowed(self, tenant: Tenant | None, route_name: str | None = None,
                      alias: str | None = None) -> None:
        """Raise PermissionDenied when the tenant's allow lists exclude the route or model alias.

        With an alias and no route (GET /v1/models), the alias must also be served by some
        route the tenant may use.
        """
        if tenant is None:
            return
        if route_name is not None and tenant.routes and route_name not in tenant.routes:
            raise route_denied(tenant, route_name)
        if alias is not None and tenant.models and not any(
                fnmatchcase(alias, allowed) for allowed in tenant.models):
            raise PermissionDenied(f"Tenant {tenant.name!r} may not use model {alias!r}.")
        if route_name is None and alias is not None and not self._routed_for(tenant, alias):
            raise PermissionDenied(f"Tenant {tenant.name!r} may not use model {alias!r}.")

    def _routed_for(self, tenant: Tenant, alias: str) -> bool:
        """Whether a route the tenant may use takes this alias."""
        return any((not tenant.routes or route.name in tenant.routes)
                   and (not route.match.tenants or tenant.name in route.match.tenants)
                   and any(fnmatchcase(alias, pattern) for pattern in route.match.models)
                   for route in self.routes)


def route_denied(tenant: Tenant, route_name: str) -> PermissionDenied:
    """The 403 for a route outside the tenant's allow list."""
    return PermissionDenied(f"Tenant {tenant.name!r} may not use route {route_name!r}.")


class AdminAuth:
    """Checks the admin token (header `Authorization: Bearer` or `x-admin-token`)."""

    def __init__(self, server_cfg: Server, environ: Mapping[str, str], *,
                 tenant_keys: Mapping[str, str] | None = None, source: str = "<policy>") -> None:
        """`tenant_keys`: the tenant of each key hash in the policy (`source`), none of which may be the admin's."""
        self.token_sha256 = admin_token_sha256(server_cfg, environ)
        tenant = (tenant_keys or {}).get(self.token_sha256) if self.token_sha256 is not None else None
        if tenant is not None:          # the policy's own admin hash is caught by its loader, at its line
            given = "server.admin_token_sha256" if server_cfg.admin_token_sha256 else \
                f"the admin token in ${server_cfg.admin_token_env} (server.admin_token_env)"
            raise PolicyError([PolicyProblem(source, None, f"tenants.{tenant}.keys_sha256",
                                             f"{given} is also this tenant's API key (tenant keys are never "
                                             f"accepted as the admin's)")])

    @property
    def configured(self) -> bool:
        return self.token_sha256 is not None

    def check(self, headers: Headers) -> None:
        """Pass for the admin token; else PermissionDenied (none configured) or AuthenticationFailed."""
        if self.token_sha256 is None:
            raise PermissionDenied("Admin endpoints are disabled: admin token not configured.")
        if not isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
            headers = CIMultiDict(headers)
        token = headers.get("x-admin-token") or presented_key(headers)
        if token is None or not hmac.compare_digest(sha256_hex(token), self.token_sha256):
            raise AuthenticationFailed("Missing or incorrect admin token.")


def admin_token_sha256(server_cfg: Server, environ: Mapping[str, str]) -> str | None:
    """The admin token's hash: from the policy, else hashed from the named environment variable."""
    if server_cfg.admin_token_sha256:
        return server_cfg.admin_token_sha256.lower()
    token = environ.get(server_cfg.admin_token_env or "", "").strip()
    return sha256_hex(token) if token else None


def tenant_keys(policy: Policy) -> dict[str, str]:
    """The tenant of every key hash in a policy, so AdminAuth can refuse an admin token that is one."""
    return {h.lower(): name for name, tenant in policy.tenants.items() for h in tenant.keys_sha256}
