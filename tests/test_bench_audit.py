"""The bench's arithmetic with known inputs: ratios, verdicts, medians, percentiles, wrk's figures, profiles.

The sections run against `tests/support/fake_wrk`, a stand-in for wrk that prints scripted figures and logs
each call, and against RawUpstream servers that answer the sanity request; nothing is loaded for real.
"""

from __future__ import annotations

import json
import marshal
import math
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench.machine import PORT_FLOOR, Cores, Machine, _ephemeral_floor, free_port
from bench.measure import errors_note, interleaved
from bench.options import SECTIONS, parse_options
from bench.procs import BenchSetupError, spawn
from bench.profile_stats import StageProfile, load_profile
from bench.report import (Row, SectionResult, document, fmt, median, percentile, ratio_at_least, ratio_at_most,
                          value_below, write_results)
from bench.sections import cache, latency, replay, scaling, throughput
from bench.sections.features import _stage_rows
from bench.sections.memory import Footprint, stream_problems
from bench.stack import Stack
from bench.wrk import MARKER, Load, WrkResult
from tests.support.raw_upstream import COMPLETION, RawUpstream, json_answer

FAKE_WRK_DIR = Path(__file__).resolve().parent / "support" / "fake_wrk"
UNPINNED = Cores(load=(), server=(), every=())
STARTED = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)


def row(value: float, reference: float | None = None, target=None) -> Row:
    return Row("k", "a figure", value, "ms", reference=reference, target=target)


# report: ratios, targets, verdicts -------------------------------------------------------------------------

def test_ratio_is_value_over_reference_and_none_when_either_is_unusable():
    """The ratio is value ÷ reference, and there is none for a negative value, a zero reference or a NaN."""
    assert row(3.0, reference=2.0).ratio == 1.5
    assert row(-0.1, reference=2.0).ratio is None          # noise made the added latency negative
    assert row(1.0, reference=0.0).ratio is None
    assert row(math.nan, reference=1.0).ratio is None
    assert row(1.0, reference=math.nan).ratio is None
    assert row(1.0).ratio is None


def test_ratio_targets_pass_on_their_limit_and_miss_past_it_or_without_a_ratio():
    """≤ and ≥ targets include their limit, miss just past it, and miss when there is no ratio to judge."""
    at_most = ratio_at_most(1.5)
    assert row(3.0, 2.0, at_most).verdict == "PASS"
    assert row(3.02, 2.0, at_most).verdict == "MISS"
    assert row(-1.0, 2.0, at_most).verdict == "MISS"       # a negative added latency is not a pass
    at_least = ratio_at_least(0.75)
    assert row(3.0, 4.0, at_least).verdict == "PASS"
    assert row(2.98, 4.0, at_least).verdict == "MISS"
    assert row(3.0, 0.0, at_least).verdict == "MISS"
    assert at_most.text == "≤ 1.5× reference"
    assert at_least.text == "≥ 75% of reference" and ratio_at_least(1.7).text == "≥ 1.7× reference"


def test_value_below_is_strict_and_a_nan_figure_is_not_judged():
    """`< limit` misses at the limit itself; a figure that is NaN gets n/a, and a row without target no verdict."""
    below = value_below(300, "MB")
    assert row(299.9, target=below).verdict == "PASS"
    assert row(300.0, target=below).verdict == "MISS"
    assert row(math.nan, target=below).verdict == "n/a"
    assert row(math.nan, 1.0, ratio_at_most(2)).verdict == "n/a"
    assert row(1.0).verdict == ""
    assert below.text == "< 300 MB"


def test_median_is_the_middle_of_the_sorted_numbers_leaving_nans_out():
    """The median sorts, averages the middle two of an even count, ignores NaN, and is NaN for no numbers."""
    assert median([9.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([2.0, math.nan, 1.0, 3.0]) == 2.0
    assert median([1.0, math.nan, 2.0]) == 1.5
    assert math.isnan(median([math.nan])) and math.isnan(median([]))


def test_percentile_is_the_nearest_rank_of_the_sorted_values():
    """p50 of 1..100 is 50, p99 is 99, p100 the maximum, p0 the minimum; order of input does not matter."""
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert math.isnan(percentile([], 50))


def test_figures_print_with_three_significant_digits_or_thousands():
    """Large figures (negative ones too) print whole with thousands separators, small ones to 3 digits."""
    assert fmt(12_345.6, "req/s") == "12,346 req/s"
    assert fmt(-2_500.0, "µs") == "-2,500 µs"
    assert fmt(0.123456, "ms") == "0.123 ms"
    assert fmt(-0.0456, "ms") == "-0.0456 ms"
    assert fmt(math.nan, "ms") == "n/a" and fmt(None) == ""


def test_the_document_orders_sections_by_number_and_counts_only_passes():
    """Sections appear by their title's number whatever order they ran in; the summary counts PASS rows only
    (a MISS and an n/a are not met), and the table shows ratios and escapes `|` in cells."""
    memory = SectionResult("5. Memory", [Row("memory.streams_mb", "RSS", math.nan, "MB",
                                             target=value_below(300, "MB"), note="a | b")], "memory details")
    latency_rows = [Row("latency.gateway_added_p50", "added p50", 0.3, "ms", reference=0.2, target=ratio_at_most(1.5)),
                    Row("latency.gateway_added_p99", "added p99", 0.5, "ms", reference=0.25, target=ratio_at_most(1.5))]
    added = SectionResult("1. Added latency", latency_rows, "latency details")
    text = document([memory, added], Machine(2, "Test CPU", "3.12", "6.1"), UNPINNED, "python -m bench", STARTED)
    assert "1 of 3 targets met:" in text
    assert "- added p50: 0.3 ms (1.50× reference), target ≤ 1.5× reference: **PASS**" in text
    assert "- added p99: 0.5 ms (2.00× reference), target ≤ 1.5× reference: **MISS**" in text
    assert "target < 300 MB: **n/a**" in text
    assert text.index("**1. Added latency**") < text.index("**5. Memory**")
    assert text.index("## 1. Added latency") < text.index("## 5. Memory")
    assert "| `latency.gateway_added_p50` | added p50 | 0.3 ms | 0.2 ms | 1.50× | ≤ 1.5× reference | PASS |  |" in text
    assert "| a \\| b |" in text


def test_write_results_writes_a_dated_copy_only_when_asked(tmp_path):
    """latest.md is always written; the dated copy only with dated_copy."""
    assert write_results("x", tmp_path / "a", STARTED, dated_copy=False) == [tmp_path / "a" / "latest.md"]
    paths = write_results("y", tmp_path / "b", STARTED, dated_copy=True)
    assert paths == [tmp_path / "b" / "latest.md", tmp_path / "b" / "2026-01-02-0304.md"]
    assert all(path.read_text() == "y" for path in paths)


# measure, wrk -----------------------------------------------------------------------------------------------

def test_interleaved_measures_each_contender_once_per_round():
    """Rounds go A B C, A B C: every contender is measured in each round before the next round starts."""
    order: list[str] = []
    results = interleaved(("a", "b", "c"), 2, lambda name: order.append(name) or len(order))
    assert order == ["a", "b", "c", "a", "b", "c"]
    assert results == {"a": [1, 4], "b": [2, 5], "c": [3, 6]}


def test_wrk_figures_are_read_in_microseconds_and_seconds():
    """The done hook's line gives latencies in µs, the duration in µs (read as seconds), and every kind of error."""
    figures = {"requests": 9000, "duration_us": 3_000_000, "bytes": 1,
               "errors": {"connect": 1, "read": 2, "write": 0, "status": 4, "timeout": 3},
               "latency_us": {"p50": 410, "p90": 900, "p99": 2500, "mean": 500.5, "max": 9000}}
    result = WrkResult.parse("Running 3s test\n" + MARKER + json.dumps(figures) + "\n")
    assert (result.p50_us, result.p90_us, result.p99_us, result.mean_us) == (410, 900, 2500, 500.5)
    assert result.duration_s == 3.0 and result.rps == 3000.0
    assert result.errors == 10
    assert errors_note([result, result]) == "20 failed requests!" and errors_note([]) == ""
    with pytest.raises(BenchSetupError):
        WrkResult.parse("Running 3s test\nno figures\n")


def test_wrk_script_arguments_name_model_keys_mode_and_stream():
    """The Lua script gets the model, the keys joined by commas ('-' for none), the mode and the stream flag."""
    assert Load("m", ("k1", "k2"), "same", stream=True).script_args()[:4] == ["m", "k1,k2", "same", "true"]
    assert Load("m").script_args()[:4] == ["m", "-", "unique", "false"]


# profile ----------------------------------------------------------------------------------------------------

REQUESTS = 4


def entry(file: str, line: int, func: str, calls: int, self_us: float, cumulative_us: float,
          primitive_calls: int | None = None) -> tuple:
    """One pstats row whose per-request figures over REQUESTS requests are the given µs."""
    seconds = REQUESTS / 1e6
    return (file, line, func), (primitive_calls or calls, calls, self_us * seconds, cumulative_us * seconds, {})


def test_profile_attributes_cpu_per_request_by_stage_telemetry_and_hotspot(tmp_path):
    """From a known profile: a stage is its handle + finish, the pipeline its `run`, the total the sum of self
    times, counted calls are per request, and gateway hotspots go by cumulative time without stages."""
    rows = dict([
        entry("/srv/app/gateway/stages/parse.py", 10, "handle", 4, 1.0, 10.0),
        entry("/srv/app/gateway/stages/parse.py", 20, "finish", 4, 0.5, 2.0),
        entry("/srv/app/gateway/stages/parse.py", 30, "_helper", 4, 3.0, 30.0),
        entry("/srv/app/gateway/pipeline.py", 5, "run", 4, 1.0, 50.0),
        entry("/srv/app/gateway/telemetry/tracing.py", 7, "start_request", 4, 1.0, 4.0),
        entry("/srv/app/gateway/telemetry/spans.py", 3, "server", 8, 0.5, 0.5, primitive_calls=4),
        entry("/srv/app/gateway/telemetry/sums.py", 3, "add", 12, 2.0, 2.0),
        entry("~", 0, "<method 'run_forever' of 'uvloop.Loop' objects>", 1, 100.0, 200.0),
        entry("/srv/app/gateway/server.py", 40, "handle_request", 4, 6.0, 75.0),
    ])
    path = tmp_path / "gateway.prof"
    path.write_bytes(marshal.dumps(rows))
    profile = load_profile(path, REQUESTS, top=3)
    assert profile.stages_us["parse"] == pytest.approx(12.0)
    assert profile.stages_us["route"] == 0.0
    assert profile.pipeline_us == pytest.approx(50.0)
    assert profile.telemetry_us == pytest.approx(4.0)
    assert profile.total_us == pytest.approx(1.0 + 0.5 + 3.0 + 1.0 + 1.0 + 0.5 + 2.0 + 100.0 + 6.0)
    assert profile.counts["spans drafted (server and children)"] == 2.0
    assert profile.counts["counter additions"] == 3.0
    assert [spot.where for spot in profile.hotspots] == ["<method 'run_forever' of 'uvloop.Loop' objects>",
                                                         "gateway/server.py:40 handle_request",
                                                         "gateway/stages/parse.py:30 _helper"]
    assert profile.hotspots[0].self_us == pytest.approx(100.0)
    assert [spot.where for spot in profile.gateway_hotspots] == ["gateway/server.py:40 handle_request",
                                                                 "gateway/telemetry/tracing.py:7 start_request",
                                                                 "gateway/telemetry/sums.py:3 add"]
    assert profile.gateway_hotspots[0].cumulative_us == pytest.approx(75.0)


def test_stage_rows_scale_the_profile_and_split_pipeline_from_outside():
    """Stage rows are profiled µs × scale; the pipeline's own loop is run − stages, and outside is total − run."""
    profile = StageProfile(total_us=100.0, stages_us={"parse": 10.0, "route": 6.0}, pipeline_us=40.0,
                           telemetry_us=0.0, counts={}, hotspots=[], gateway_hotspots=[])
    rows = {r.key: r.value for r in _stage_rows(profile, 0.5, 42.0)}
    assert rows == {"features.loop_cpu_us": 42.0, "features.stage.parse": 5.0, "features.stage.route": 3.0,
                    "features.pipeline_other": 12.0, "features.outside_pipeline": 30.0}


def test_per_stream_memory_is_the_growth_over_idle_in_kilobytes():
    """RSS per stream is (peak − idle) ÷ streams opened, in KB of 1,000 bytes."""
    footprint = Footprint(idle=50_000_000, peak=80_000_000, after=52_000_000, opened=1000, failures=Counter(),
                          open_s=1.0)
    assert footprint.per_stream_kb == 30.0


def test_streams_that_did_not_all_open_are_a_problem_that_withholds_the_verdict():
    """RSS with fewer streams than asked for is no verdict on the target: a stream short, or one that failed, is
    named; all 1,000 open with none failed is none."""
    def problems(opened: int, **failures: int) -> list[str]:
        return stream_problems(Footprint(idle=1, peak=2, after=1, opened=opened, failures=Counter(failures),
                                         open_s=1.0), 1000)

    assert problems(1000) == []
    assert problems(999) == ["only 999 of 1000 streams opened"]
    assert problems(1000, status_503=2) == ["2 × status_503"]


# machine, options -------------------------------------------------------------------------------------------

def test_the_core_plan_keeps_the_load_generator_off_the_server_cores():
    """With two or more cores and taskset, wrk gets the first core and the server under test the others."""
    cores = Cores.plan()
    if not cores.every:
        pytest.skip("one core or no taskset: the bench runs unpinned")
    assert cores.every == tuple(sorted(os.sched_getaffinity(0)))
    assert cores.load == cores.every[:1] and cores.server == cores.every[1:]
    assert "server under test on CPU" in cores.describe()


def test_scaling_cores_are_the_server_cores_only_when_there_are_two():
    """Two workers run on the server cores when there are at least two of them, else on every core."""
    assert Cores(load=(0,), server=(1, 2), every=(0, 1, 2)).scaling == (1, 2)
    assert Cores(load=(0,), server=(1,), every=(0, 1)).scaling == (0, 1)
    assert UNPINNED.describe() == "unpinned (one core or no taskset)"


def test_free_ports_are_never_handed_out_twice_and_stay_below_the_ephemeral_range():
    """A thousand free ports are all different, at or above PORT_FLOOR and below the kernel's ephemeral range."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
    if _ephemeral_floor() - PORT_FLOOR > 1000:
        assert all(PORT_FLOOR <= port < _ephemeral_floor() for port in ports)


def test_options_run_sections_in_their_own_order_and_explicit_flags_beat_quick():
    """--only keeps the bench's section order (memory first); --quick shortens, explicit flags override it."""
    assert parse_options(["--only", "replay", "--only", "memory"]).sections == ("memory", "replay")
    options = parse_options(["--quick", "--duration", "4"])
    assert (options.duration_s, options.runs, options.streams, options.dated_copy) == (4, 1, 200, True)
    assert parse_options([]).sections == SECTIONS and parse_options([]).runs == 3
    assert parse_options(["--no-dated-copy"]).dated_copy is False


# sections against the fake wrk ------------------------------------------------------------------------------

class FakeWrk:
    """The fake wrk's plan and call log."""

    def __init__(self, workdir: Path) -> None:
        self.plan_path, self.log_path = workdir / "wrk-plan.json", workdir / "wrk-log.jsonl"

    def plan(self, runs: dict[str, list[dict]]) -> None:
        self.plan_path.write_text(json.dumps(runs))

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@pytest.fixture
def fake_wrk(tmp_path, monkeypatch) -> FakeWrk:
    """`wrk` on PATH is the fake, reading its plan from and logging its calls to tmp_path."""
    fake = FakeWrk(tmp_path)
    monkeypatch.setenv("PATH", f"{FAKE_WRK_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_WRK_PLAN", str(fake.plan_path))
    monkeypatch.setenv("FAKE_WRK_LOG", str(fake.log_path))
    return fake


@pytest.fixture
def upstreams():
    """Start RawUpstreams (for the sections' sanity requests); all stopped after the test."""
    started: list[RawUpstream] = []

    def start() -> RawUpstream:
        started.append(RawUpstream().start())
        return started[-1]

    yield start
    for upstream in started:
        upstream.stop()


def stack_of(cores: Cores, upstreams, *names: str, headers: dict[str, str] | None = None) -> Stack:
    """A Stack that starts nothing: each contender's port is a RawUpstream ('direct' is nginx's port)."""
    stack = Stack(cores)
    for name in names:
        upstream = upstreams()
        upstream.script = json_answer(COMPLETION, headers=headers)
        stack.ports["nginx" if name == "direct" else name] = upstream.port
    return stack


def wrk_run(p50_us: float, p99_us: float = 0.0, requests: int = 1000, duration_s: float = 1.0,
            errors: int = 0) -> dict:
    """One scripted wrk run for the fake's plan."""
    return {"requests": requests, "duration_s": duration_s, "errors": errors, "p50_us": p50_us, "p90_us": p99_us,
            "p99_us": p99_us}


def test_added_latency_is_the_median_of_each_rounds_difference_to_direct(fake_wrk, upstreams):
    """Latency rows: direct is absolute, a proxy's added latency is the median over rounds of (its − direct's)
    in ms, the gateway is judged against the baseline's added latency, and the rounds run direct, baseline,
    gateway in turn at concurrency 1."""
    with stack_of(UNPINNED, upstreams, *latency.CONTENDERS) as stack:
        fake_wrk.plan({
            stack.url("direct"): [wrk_run(1000, 2000), wrk_run(3000, 5000), wrk_run(1100, 2100)],
            stack.url("baseline"): [wrk_run(1400, 2500), wrk_run(3300, 5600), wrk_run(1500, 2500)],
            stack.url("gateway"): [wrk_run(1500, 3000), wrk_run(3500, 5900), wrk_run(1600, 2800, errors=2)],
        })
        result = latency.run(stack, parse_options(["--runs", "3", "--duration", "1"]))
        urls = [stack.url(name) for name in latency.CONTENDERS]
    rows = {r.key: r for r in result.rows}
    assert rows["latency.direct_p50"].value == pytest.approx(1.1)
    assert rows["latency.direct_p99"].value == pytest.approx(2.1)
    assert rows["latency.baseline_added_p50"].value == pytest.approx(0.4)
    assert rows["latency.baseline_added_p99"].value == pytest.approx(0.5)
    gateway_p50, gateway_p99 = rows["latency.gateway_added_p50"], rows["latency.gateway_added_p99"]
    assert gateway_p50.value == pytest.approx(0.5) and gateway_p50.reference == pytest.approx(0.4)
    assert gateway_p50.verdict == "PASS" and gateway_p50.note == "2 failed requests!"
    assert gateway_p99.value == pytest.approx(0.9) and gateway_p99.reference == pytest.approx(0.5)
    calls = fake_wrk.calls()
    assert [call["url"] for call in calls] == urls * 3
    assert {call["connections"] for call in calls} == {1}


def test_throughput_judges_the_gateway_against_the_baseline_not_nginx(fake_wrk, upstreams, monkeypatch):
    """Throughput rows are requests ÷ seconds, the gateway's c32 figure is judged as a share of the
    baseline's c32 (not of direct nginx, which only measures wrk), and CPU per request is in µs."""
    with stack_of(UNPINNED, upstreams, "direct", *throughput.CONTENDERS) as stack:
        stack.procs["baseline"] = spawn("baseline", ["sleep", "60"], cpus=(), logdir=stack.workdir)
        stack.procs["gateway"] = spawn("gateway", [sys.executable, "-c", "while True: pass"], cpus=(),
                                       logdir=stack.workdir)
        monkeypatch.setenv("FAKE_WRK_BUSY_PID", str(stack.pid("gateway")))
        monkeypatch.setenv("FAKE_WRK_BUSY_S", "0.1")           # each wrk run: ≥ 0.1 s of the gateway's CPU
        fake_wrk.plan({
            stack.url("direct"): [wrk_run(100, requests=40_000, duration_s=2.0)],
            stack.url("baseline"): [wrk_run(100, requests=10_000, duration_s=2.0), wrk_run(100, requests=6_000)],
            stack.url("gateway"): [wrk_run(100, requests=3_600), wrk_run(100, requests=4_000, errors=5)],
        })
        result = throughput.run(stack, parse_options(["--runs", "1", "--duration", "1"]))
        calls = [(call["url"], call["connections"]) for call in fake_wrk.calls()]
        assert calls == [(stack.url("direct"), 32), (stack.url("baseline"), 32), (stack.url("gateway"), 32),
                         (stack.url("baseline"), 256), (stack.url("gateway"), 256)]
    rows = {r.key: r for r in result.rows}
    assert rows["throughput.direct_c32"].value == 20_000.0
    assert rows["throughput.baseline_c32"].value == 5_000.0
    c32, c256 = rows["throughput.gateway_c32"], rows["throughput.gateway_c256"]
    assert (c32.value, c32.reference, c32.verdict) == (3_600.0, 5_000.0, "PASS")
    assert (c256.value, c256.reference, c256.note) == (4_000.0, 6_000.0, "5 failed requests!")
    cpu, loop_cpu = rows["throughput.gateway_cpu_us"], rows["throughput.gateway_loop_cpu_us"]
    floor_us = 0.1 * 1e6 / 3_600                        # ≥ 0.1 s of CPU over the c32 run's 3,600 requests
    assert floor_us <= cpu.value < 100 * floor_us and cpu.reference < 1.0          # `sleep` uses no CPU
    assert floor_us <= loop_cpu.value <= cpu.value


@pytest.mark.parametrize(("every", "judged"), [((0, 1, 2, 3), True), ((0, 1, 2), False)])
def test_scaling_is_judged_only_with_four_cores(fake_wrk, upstreams, every, judged):
    """Two workers' throughput is a ratio to one worker's, judged against 1.7× only with four cores or more."""
    cores = Cores(load=(), server=every[1:], every=every)
    with stack_of(cores, upstreams, *scaling.NEEDS) as stack:
        fake_wrk.plan({stack.url("gateway"): [wrk_run(100, requests=1_000)],
                       stack.url("gateway-w2"): [wrk_run(100, requests=1_800)]})
        result = scaling.run(stack, parse_options(["--runs", "1", "--duration", "1"]))
    w2 = {r.key: r for r in result.rows}["scaling.w2_rps"]
    assert (w2.value, w2.reference) == (1_800.0, 1_000.0)
    assert w2.verdict == ("PASS" if judged else "")
    assert ("not judged" in w2.note) is not judged


@pytest.mark.parametrize("sanity", ["hit", "miss"])
def test_cache_hits_are_judged_in_ms_against_the_miss_and_a_sanity_miss_is_named(fake_wrk, upstreams, redis_server,
                                                                                  sanity):
    """Hit runs send the same body and miss runs unique ones; the hit p50 in ms, with the miss as its reference,
    is judged below 1 ms, and a sanity repeat that was not a hit is said in the row's note."""
    with stack_of(UNPINNED, upstreams, *cache.NEEDS, headers={"x-gateway-cache": sanity}) as stack:
        stack.ports["redis"] = redis_server.port
        fake_wrk.plan({stack.url(cache.GATEWAY): [wrk_run(400, 900), wrk_run(2000, 4000)],       # hit, then miss
                       stack.url(cache.NO_TELEMETRY): [wrk_run(300, 700)]})
        result = cache.run(stack, parse_options(["--runs", "1", "--duration", "1"]))
        calls = [(call["url"], call["script_args"][2]) for call in fake_wrk.calls()]
        assert calls == [(stack.url(cache.GATEWAY), "same"), (stack.url(cache.GATEWAY), "unique"),
                         (stack.url(cache.NO_TELEMETRY), "same")]
    rows = {r.key: r for r in result.rows}
    hit = rows["cache.hit_p50"]
    assert (hit.value, hit.reference, hit.verdict) == (0.4, 2.0, "PASS")
    assert hit.note == ("" if sanity == "hit" else "sanity repeat was a miss, not a hit!")
    assert (rows["cache.hit_p99"].value, rows["cache.hit_p99"].reference) == (0.9, 4.0)
    assert rows["cache.hit_notel_p50"].value == 0.3
    assert (rows["cache.miss_redis_p50"].value, rows["cache.miss_redis_p99"].value) == (2.0, 4.0)


@pytest.mark.parametrize("direct_status", [200, 503])
def test_replay_offers_the_traces_arrivals_over_the_wall_window_and_counts_answers(upstreams, tmp_path,
                                                                                    direct_status):
    """The replay keeps the arrivals of the first window × speed trace seconds, caps prompts and asks for at
    least one token; offered load is arrivals ÷ wall seconds, success is the share answered 200, in %, and
    answers that were not 200 give no latency."""
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,5\n0.1,20000,0\n0.3,10,3\n0.5,10,3\n")
    arrivals = replay.read_arrivals(trace, window_s=0.2, speed=2.0)
    assert arrivals == [replay.Arrival(0.0, 100, 5), replay.Arrival(0.05, replay.MAX_PROMPT_TOKENS, 1),
                        replay.Arrival(0.15, 10, 3)]
    with stack_of(UNPINNED, upstreams, "gateway") as stack:
        simulated = upstreams()
        simulated.script = json_answer(COMPLETION if direct_status == 200 else {"error": {}}, status=direct_status)
        stack.ports["replay"] = simulated.port                # the simulated model's port in the policy
        result = replay.run(stack, parse_options(["--trace", str(trace), "--replay-seconds", "0.2", "--speed", "2"]))
    rows = {r.key: r for r in result.rows}
    assert rows["replay.offered_rps"].value == pytest.approx(15.0)
    assert rows["replay.achieved_rps"].reference == pytest.approx(15.0)
    assert rows["replay.success"].value == 100.0
    if direct_status == 200:
        assert rows["replay.direct_p50"].value > 0.0
    else:
        assert math.isnan(rows["replay.direct_p50"].value) and math.isnan(rows["replay.added_p50"].value)
