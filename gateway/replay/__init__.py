"""What-if replay: recorded traffic against routing policies, in virtual time, with the real router."""

from gateway.replay.chart import render_chart
from gateway.replay.compare import Comparison, ModelChange, compare
from gateway.replay.outcome import Outcome, ReplayResult
from gateway.replay.report import render_json, render_markdown
from gateway.replay.simulate import replay
from gateway.replay.summary import Summary, summarize
from gateway.replay.traffic import ReplayRequest, TrafficError, read_traffic

__all__ = ["Comparison", "ModelChange", "Outcome", "ReplayRequest", "ReplayResult", "Summary", "TrafficError",
           "compare", "read_traffic", "render_chart", "render_json", "render_markdown", "replay", "summarize"]
