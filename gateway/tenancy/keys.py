"""`gateway keys`: mint tenant API keys and hash secrets for the policy file."""

from __future__ import annotations

import argparse
import secrets
import sys

from gateway.policy.load import tenant_name_problem
from gateway.tenancy.identity import sha256_hex

KEY_PREFIX = "gw-"


def new_key() -> tuple[str, str]:
    """A fresh API key (256 random bits) and the SHA-256 hex the policy stores."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, sha256_hex(key)


def parser() -> argparse.ArgumentParser:
    """The `gateway keys` command line."""
    cli = argparse.ArgumentParser(prog="gateway keys", description=__doc__)
    commands = cli.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="mint an API key for a tenant")
    new.add_argument("--tenant", required=True, help="the tenant name in the policy")
    commands.add_parser("hash", help="print the SHA-256 of a secret read from stdin "
                                     "(for keys_sha256 or server.admin_token_sha256)")
    return cli


def main(argv: list[str] | None = None) -> int:
    """Run `gateway keys new --tenant NAME` or `gateway keys hash`; returns the exit status."""
    args = parser().parse_args(argv)
    if args.command == "hash":
        line = sys.stdin.readline()
        secret = line.strip()
        if not secret:      # an empty line first (`printf '\nsecret\n'`) is not "nothing on stdin": say which it is
            problem = "the first line of stdin is empty: give the secret on it" if line else "nothing on stdin"
            print(f"gateway keys hash: {problem}", file=sys.stderr)
            return 2
        print(sha256_hex(secret))
        return 0
    if (problem := tenant_name_problem(args.tenant)) is not None:     # a name the policy would refuse
        print(f"gateway keys new: --tenant {args.tenant!r}: a tenant name {problem}", file=sys.stderr)
        return 2
    key, key_sha256 = new_key()
    print(f"API key for tenant {args.tenant!r} (shown once; give it to the tenant):")
    print(f"  {key}")
    print(f"Add its hash to tenants.{args.tenant} in the policy (for a tenant with keys already, add it to its "
          f"keys_sha256 list; to rotate a key, remove the old hash once its clients use the new key: that revokes it):")
    print(f'  keys_sha256: ["{key_sha256}"]')
    return 0
