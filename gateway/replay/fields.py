"""One field of a traffic line, read and checked: every error names the file, the line and the key."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway.errors import ClientError
from gateway.policy.model import ENDPOINTS
from gateway.routing.needs import canonical

DEFAULT_ALIAS = "auto"


class TrafficError(ClientError):
    """A traffic file that cannot be read: names the file and line."""

    code = "invalid_traffic"


def json_object(path: Path, line: int, raw: str) -> dict[str, Any]:
    """One line parsed as a JSON object."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise TrafficError(f"{path}:{line}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise TrafficError(f"{path}:{line}: not valid JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise TrafficError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return value


def count(path: Path, line: int, key: str, value: Any) -> int:
    """A non-negative whole token count (a string of decimal digits is accepted, as CSV gives)."""
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise TrafficError(f"{path}:{line}: {key}: expected a non-negative whole number, got {value!r}")


def seconds(path: Path, line: int, key: str, value: Any) -> float:
    """A timestamp: finite seconds (any epoch) as a number or a numeric string, or an ISO 8601 date and time
    (UTC if no zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        return _finite(path, line, key, number, value)
    if isinstance(value, str):
        number = _number_or_none(value)
        if number is not None:
            return _finite(path, line, key, number, value)
        try:
            return epoch_s(value)
        except ValueError as exc:
            raise TrafficError(f"{path}:{line}: {key}: not a number or ISO 8601 time: {value!r}") from exc
    raise TrafficError(f"{path}:{line}: {key}: expected seconds or an ISO 8601 time, got {value!r}")


def _number_or_none(text: str) -> float | None:
    """A string that spells a number (seconds), as a float; None for anything else, an ISO time say."""
    try:
        return float(text)
    except ValueError:
        return None


def _finite(path: Path, line: int, key: str, number: float, value: Any) -> float:
    """`number`, or a TrafficError when it is infinite or NaN."""
    if not math.isfinite(number):
        raise TrafficError(f"{path}:{line}: {key}: expected a finite number of seconds, got {value!r}")
    return number


def epoch_s(text: str) -> float:
    """An ISO 8601 date and time as Unix seconds; one without a time zone is read as UTC, not local time."""
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def text(path: Path, line: int, key: str, value: Any) -> str | None:
    """An optional string field."""
    if value is None or isinstance(value, str):
        return value
    raise TrafficError(f"{path}:{line}: {key}: expected a string, got {value!r}")


def features(path: Path, line: int, key: str, value: Any) -> tuple[str, ...]:
    """An optional list of what a request used beyond text (a ledger's `uses`), in FEATURES order; names this
    gateway does not know are left out; absent (or null) is none."""
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return canonical(value)
    raise TrafficError(f"{path}:{line}: {key}: expected a list of strings such as [\"images\", \"tools\"], "
                       f"got {value!r}")


def flag(path: Path, line: int, key: str, value: Any) -> bool:
    """An optional true/false field; absent (or null) is true."""
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    raise TrafficError(f"{path}:{line}: {key}: expected true or false, got {value!r}")


def endpoint(path: Path, line: int, value: Any) -> str:
    """chat (the default), completions or embeddings."""
    if value is None:
        return "chat"
    if value in ENDPOINTS:
        return value
    raise TrafficError(f"{path}:{line}: endpoint: expected one of {', '.join(ENDPOINTS)}, got {value!r}")
