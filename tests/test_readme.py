"""The README documents what exists: every command-line flag, policy key, environment variable and metric."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics, hw_metrics

from gateway import cli
from gateway.energy import command as gpu_command
from gateway.replay import cli as replay_cli
from gateway.simulator import cli as simulator_cli
from gateway.tenancy import keys as keys_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SOURCES = {path: path.read_text() for path in (ROOT / "gateway").rglob("*.py")}


def flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --option of a parser and of its subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(option for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= flags(sub)
    return found - {"--help", "--version"}


PARSERS = {"gateway": cli.build_parser(), "gateway gpu": gpu_command.build_parser(),
           "gateway replay": replay_cli.build_parser(), "gateway simulate-backend": simulator_cli.build_parser(),
           "gateway keys": keys_cli.parser()}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_is_documented(command: str) -> None:
    """Each flag a command accepts is named in the README."""
    missing = sorted(flag for flag in flags(PARSERS[command])
                     if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README))
    assert not missing, f"{command}: flags the README does not name: {missing}"


def test_every_policy_key_is_documented() -> None:
    """Each key the policy loader accepts appears in the README's policy reference or text."""
    load = (ROOT / "gateway/policy/load.py").read_text()
    keys = set(re.findall(r'^\s+"([a-z_0-9]+)":', load, re.MULTILINE))
    assert len(keys) > 40                    # the loader's sections were read
    missing = sorted(key for key in keys if f"{key}:" not in README and f"`{key}`" not in README)
    assert not missing, f"policy keys the README does not name: {missing}"


def test_every_environment_variable_is_documented() -> None:
    """Each GATEWAY_* and OTEL_* variable the gateway reads is named in the README."""
    names = {name for text in SOURCES.values() for name in re.findall(r"\b((?:GATEWAY|OTEL)_[A-Z0-9_]*[A-Z0-9])\b", text)}
    assert "GATEWAY_REDIS_URL" in names
    missing = sorted(name for name in names if name not in README)
    assert not missing, f"environment variables the README does not name: {missing}"


def test_every_metric_is_documented() -> None:
    """Each metric the gateway creates is named in the README's telemetry section."""
    pattern = re.compile(r'(?:Buckets|Sums|create_[a-z_]+)\(\s*(?:meter,\s*)?"((?:gateway|gen_ai|hw)\.[a-z_.]+)"')
    names = {name for text in SOURCES.values() for name in pattern.findall(text)}
    constants = {"gen_ai_metrics": gen_ai_metrics, "hw_metrics": hw_metrics}    # semantic-convention names
    names |= {getattr(constants[module], constant) for text in SOURCES.values()
              for module, constant in re.findall(r"\b(gen_ai_metrics|hw_metrics)\.([A-Z_]+)\b", text)}
    assert {"gateway.requests", "gateway.store.failures", "gen_ai.client.token.usage", "hw.power"} <= names
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"metrics the README does not name: {missing}"


def test_every_section_a_newcomer_needs_is_there() -> None:
    """The README keeps its set-up commands and the sections the rest of it points to."""
    assert "pip install -e . && gateway demo" in README and "scripts/test" in README
    headings = set(re.findall(r"^## (.+)$", README, re.MULTILINE))
    assert {"Set up a fresh machine", "Routing: the smallest model that meets the SLA", "Cache",
            "Tenants, limits and budgets", "Telemetry", "GPU power and energy", "What-if replay", "Performance",
            "Production", "Development"} <= headings
