"""The command line's global flags reach every command, also those that parse their own arguments."""

from __future__ import annotations

import hashlib
import io

import pytest

from gateway.cli import main


@pytest.mark.parametrize("flag", [["--log-level", "WARNING"], ["--log-level=WARNING"], []])
def test_log_level_may_precede_a_command_that_parses_its_own_arguments(flag, monkeypatch, capsys):
    """`gateway --log-level WARNING keys hash` runs the command instead of refusing the flag."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a secret\n"))
    assert main([*flag, "keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"a secret").hexdigest()


def test_log_level_still_precedes_the_commands_argparse_knows(capsys):
    assert main(["--log-level", "WARNING", "policy", "check", "gateway/data/demo.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
