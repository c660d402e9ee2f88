"""A routing decision as a human-readable table: what `policy explain` prints."""

from __future__ import annotations

from gateway.context import Decision
from gateway.policy.model import Sla

_COLUMNS = ("model", "size_b", "tier", "ctx", "ttft_ms", "latency_ms", "cost_usd", "energy_j", "verdict")


def format_sla(sla: Sla) -> str:
    """A route's SLA terms in one line."""
    terms = [f"p95_latency_ms {sla.p95_latency_ms:g}" if sla.p95_latency_ms is not None else "",
             f"p95_ttft_ms {sla.p95_ttft_ms:g}" if sla.p95_ttft_ms is not None else "",
             f"min_tier {sla.min_tier}" if sla.min_tier else "",
             f"max_cost_usd {sla.max_cost_usd}" if sla.max_cost_usd is not None else "",
             f"max_energy_j {sla.max_energy_j:g}" if sla.max_energy_j is not None else "",
             f"on_violation {sla.on_violation}"]
    return ", ".join(term for term in terms if term)


def _verdict(decision: Decision, index: int) -> str:
    """'chosen', 'kept', 'fallback' or 'dropped: reasons' for one candidate."""
    candidate = decision.candidates[index]
    if decision.plan and candidate.model is decision.plan[0]:
        return "chosen (explored)" if decision.explored else "chosen"
    if candidate.kept:
        return "kept"
    planned = " (in plan)" if any(m is candidate.model for m in decision.plan) else ""
    return f"dropped: {', '.join(candidate.reasons)}{planned}"


def _energy(joules: float | None) -> str:
    """Predicted joules, or '-' for a model whose energy is not measured (yet)."""
    return "-" if joules is None else f"{joules:.1f}"


def _rows(decision: Decision) -> list[tuple[str, ...]]:
    """One row per candidate, in the order they were judged (smallest first)."""
    return [(c.model.name, f"{c.model.size_b:g}", str(c.model.tier), str(c.model.context_window),
             f"{c.predicted_ttft_ms:.0f}", f"{c.predicted_latency_ms:.0f}",
             f"{c.predicted_cost_usd:.6f}", _energy(c.predicted_energy_j), _verdict(decision, i))
            for i, c in enumerate(decision.candidates)]


def format_decision(decision: Decision) -> str:
    """The decision as text: route and SLA, plan, one row per candidate, note."""
    rows = [_COLUMNS, *_rows(decision)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [f"route {decision.route.name}: {format_sla(decision.route.sla)}",
             f"sla met: {'yes' if decision.sla_met else 'no'}",
             f"plan: {' -> '.join(m.name for m in decision.plan) or '(none)'}", ""]
    for row in rows:
        cells = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    if decision.note:
        lines += ["", f"note: {decision.note}"]
    return "\n".join(lines)
