"""The `gateway` command: run, demo, simulate-backend, policy, keys, gpu, replay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from pathlib import Path

from gateway import __version__


class StoppedStarting(SystemExit):
    """A SIGTERM came before the gateway served (raised by `_stop_starting`). A SystemExit: an event loop
    already running start-up (uvloop's, asyncio's) passes it on, where it logs any other exception a signal
    handler raises as 'Exception in callback' and goes on to serve."""


def _stop_starting(_signum, _frame) -> None:
    raise StoppedStarting


def _run(args: argparse.Namespace) -> int:
    """`gateway run`. A SIGTERM before it serves (while it imports, loads the policy, starts its stores) stops it,
    exit 0: as PID 1 of a container (`docker stop`, a pod deleted while it starts) the kernel drops a signal its
    process has no handler for, which would leave it to serve on until the SIGKILL. Serving installs the drain's."""
    previous = signal.signal(signal.SIGTERM, _stop_starting)
    try:
        from gateway.server import serve

        return serve(args.policy, host=args.host, port=args.port, workers=args.workers,
                     metrics_port=args.metrics_port)
    except StoppedStarting:
        logging.getLogger("gateway").info("stopped by SIGTERM before serving")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo
    from gateway.server import ListenError

    try:
        return asyncio.run(run_demo(host=args.host, port=args.port, duration_s=args.duration))
    except ListenError as exc:
        logging.getLogger("gateway").error("%s", exc)
        return 1


def _policy_check(args: argparse.Namespace) -> int:
    from gateway.policy.advice import advice
    from gateway.policy.load import read_policy

    status = 0
    for path in args.files:
        policy, problems = read_policy(path)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            status = 1
            print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
            continue
        print(f"{path}: ok")
        for note in advice(policy):
            print(f"{path}: note: {note}", file=sys.stderr)
    return status


def _policy_explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain_main

    return explain_main(args)


#: subcommands that parse their own arguments: they live with the feature they run
DELEGATED = {
    "simulate-backend": ("gateway.simulator.cli", "serve simulated OpenAI-compatible models"),
    "keys": ("gateway.tenancy.keys", "make tenant API keys (keys new --tenant NAME)"),
    "gpu": ("gateway.energy.monitor", "show the GPUs and their power readings"),
    "replay": ("gateway.replay.cli", "what-if replay of traffic against policies"),
}


#: the process id tells the workers of `gateway run --workers N` (and the supervisor) apart
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"seconds are a positive, finite number, got {text}")
    return value


#: the most worker processes per CPU core: past one per core they only add memory and context switches, and a
#: typo (`--workers 1000`) must not fork the machine out of memory
WORKERS_PER_CORE = 8


def worker_count(text: str) -> int:
    """A number of worker processes, 1 to WORKERS_PER_CORE per CPU core."""
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers: {text!r}") from None
    if workers < 1:
        raise argparse.ArgumentTypeError(f"workers are 1 or more, got {workers}")
    most = WORKERS_PER_CORE * (os.cpu_count() or 1)
    if workers > most:
        raise argparse.ArgumentTypeError(
            f"{workers} workers on {os.cpu_count() or 1} CPU core(s): at most {most} ({WORKERS_PER_CORE} a core)")
    return workers


def log_level(text: str) -> str:
    """A logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL), any case."""
    level = text.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenTelemetry-native inference gateway")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # No default here: GATEWAY_LOG_LEVEL is read in `main`, so that a bad value is said as the variable's.
    parser.add_argument("--log-level", type=log_level, default=None, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, for every command (default: GATEWAY_LOG_LEVEL, "
                             "else INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the gateway on a policy file")
    run.add_argument("--policy", required=True, type=Path, help="policy YAML file")
    run.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    run.add_argument("--port", type=port_number, default=8080, help="port to serve on, 0 to 65535 (default 8080)")
    run.add_argument("--workers", type=worker_count, default=1,
                     help="worker processes sharing the port (SO_REUSEPORT), restarted when one dies (default 1; "
                          f"at most {WORKERS_PER_CORE} a CPU core)")
    run.add_argument("--metrics-port", type=port_number, default=None,
                     help="serve GET /metrics on this port alone, not on --port (keep it off the ingress: its series "
                          "name every tenant, its spend and budgets)")
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo", help="simulated small/medium/large models and the gateway, no Redis needed")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    demo.add_argument("--port", type=port_number, default=8080,
                      help="port to serve on, 0 for a free one (default 8080)")
    demo.add_argument("--duration", type=seconds, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.set_defaults(func=_demo)

    policy = commands.add_parser("policy", help="check or explain a policy file")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate policy files; exit 1 on any problem")
    check.add_argument("files", nargs="+", type=Path)
    check.set_defaults(func=_policy_check)
    explain = policy_commands.add_parser("explain", help="which model would this request get, and why")
    explain.add_argument("file", type=Path)
    explain.add_argument("--request", required=True, type=Path, help="request JSON file ('-' for stdin)")
    explain.add_argument("--endpoint", default="chat", choices=["chat", "completions", "embeddings", "responses"])
    explain.add_argument("--header", action="append", default=[], metavar="K:V")
    explain.add_argument("--tenant", default=None, help="tenant name to match routes as")
    explain.set_defaults(func=_policy_explain)

    for name, (module, text) in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    given, rest = _leading_log_level(argv)
    if rest and rest[0] in DELEGATED:
        import importlib

        level = _checked_log_level(given)
        if level is None:
            return 2
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return importlib.import_module(DELEGATED[rest[0]][0]).main(rest[1:])
    args = build_parser().parse_args(argv)
    level = args.log_level or _checked_log_level(None)
    if level is None:
        return 2
    logging.basicConfig(level=level, format=LOG_FORMAT)
    return args.func(args)


def _checked_log_level(given: str | None) -> str | None:
    """The log level `given` with --log-level, else GATEWAY_LOG_LEVEL's (unset or empty: INFO); None, said in one
    line naming where it came from (an operator who never typed --log-level looks for the variable), when it is no
    level."""
    if given is not None:
        source, text = "argument --log-level", given
    else:
        source, text = "GATEWAY_LOG_LEVEL", os.environ.get("GATEWAY_LOG_LEVEL")
    try:
        return log_level(text or "INFO")
    except argparse.ArgumentTypeError as exc:
        print(f"gateway: error: {source}: {exc}", file=sys.stderr)
        return None


def _leading_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """The `--log-level LEVEL` given before the command (the last, when given more than once, as argparse reads
    it), and the arguments after them: the commands that parse their own arguments take the global flag too."""
    given = None
    while argv:
        if argv[0] == "--log-level" and len(argv) > 1:
            given, argv = argv[1], argv[2:]
        elif argv[0].startswith("--log-level="):
            given, argv = argv[0].partition("=")[2], argv[1:]
        else:
            break
    return given, argv
