"""Header regexes of route matches, compiled by RE2 (as Envoy's `safe_regex`).

A route's header condition runs on every request that reaches it, on a value
the client chose. Python's backtracking `re` can take exponential time on
some patterns (`(a+)+b` against 30 `a`s and a `c` takes seconds, holding the
event loop and every other request); RE2 matches in time linear in the
value, whatever the pattern. The price: RE2 has no lookarounds and no
backreferences, so a pattern with them is a policy problem.
"""

from __future__ import annotations

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False         # a refused pattern is the policy's problem to report, not a line on stderr


def compile_header_regex(pattern: str):
    """The compiled pattern (`fullmatch` like `re`'s); ValueError with RE2's reason when it cannot compile."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        reason = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(f"{reason} (header regexes are RE2, linear in time: no lookarounds, no "
                         f"backreferences)") from None
