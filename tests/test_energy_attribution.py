"""The energy ledger: idle subtraction, token-proportional split, and the books always balance."""

from __future__ import annotations

import math

import pytest

from gateway.energy.attribution import EnergyLedger, IdleLearner
from tests.support.fake_pynvml import ManualClock


def ledger_with(idle_w: float | None = None) -> tuple[EnergyLedger, ManualClock]:
    clock = ManualClock()
    return EnergyLedger({"big": idle_w}, clock=clock), clock


def test_three_to_one_tokens_get_three_to_one_of_active_energy():
    """Two concurrent requests that processed 300 and 100 tokens share the energy above idle 3:1."""
    ledger, clock = ledger_with(idle_w=100.0)
    ledger.request_started("a", "big")
    ledger.request_started("b", "big")
    clock.advance(1.0)
    ledger.progress("a", 300)
    ledger.progress("b", 100)
    split = ledger.on_interval("big", measured_j=600.0, dt_s=1.0, n_gpus=2)
    assert split.idle_j == pytest.approx(200.0)
    assert split.shares_j == pytest.approx({"a": 300.0, "b": 100.0})
    assert ledger.request_finished("a") == pytest.approx(300.0)
    assert ledger.request_finished("b") == pytest.approx(100.0)


def test_progress_is_cumulative_so_each_interval_counts_only_new_tokens():
    """Cumulative token counts are turned into per-interval progress before splitting."""
    ledger, clock = ledger_with(idle_w=0.0)
    for rid in ("a", "b"):
        ledger.request_started(rid, "big")
    ledger.progress("a", 100)
    ledger.progress("b", 100)
    ledger.on_interval("big", measured_j=100.0, dt_s=1.0)
    ledger.progress("a", 400)
    ledger.progress("b", 200)
    split = ledger.on_interval("big", measured_j=400.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"a": 300.0, "b": 100.0})


def test_a_quiet_interval_is_all_idle():
    """With no request in flight every joule measured is booked as idle, and the time as idle time."""
    ledger, _ = ledger_with(idle_w=50.0)
    split = ledger.on_interval("big", measured_j=500.0, dt_s=1.0)
    totals = ledger.totals("big")
    assert (split.idle_j, split.shares_j) == (500.0, {})
    assert (totals.idle_j, totals.attributed_j, totals.idle_s, totals.active_s) == (500.0, 0.0, 1.0, 0.0)


def test_time_in_flight_splits_when_no_token_progress_is_known():
    """Without token progress, a request in flight the whole interval gets twice one in flight half of it."""
    ledger, clock = ledger_with(idle_w=0.0)
    ledger.request_started("whole", "big")
    clock.advance(0.5)
    ledger.request_started("half", "big")
    clock.advance(0.5)
    split = ledger.on_interval("big", measured_j=300.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"whole": 200.0, "half": 100.0})


def test_a_request_without_visible_progress_counts_at_the_rate_of_the_streams_beside_it():
    """A non-streamed request (no progress until it ends) is not starved by streams beside it: it is counted
    as progressing at their mean rate per second in flight, for the time it was in flight."""
    ledger, clock = ledger_with(idle_w=0.0)
    ledger.request_started("stream", "big")
    ledger.request_started("whole", "big", tracks_tokens=False)
    clock.advance(0.5)
    ledger.request_started("half", "big", tracks_tokens=False)
    clock.advance(0.5)
    ledger.progress("stream", 300)
    split = ledger.on_interval("big", measured_j=500.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"stream": 200.0, "whole": 200.0, "half": 100.0})


def test_streams_still_split_by_tokens_when_a_request_without_progress_is_beside_them():
    """The tracked requests keep their token ratio; the untracked one takes the mean tracked rate."""
    ledger, clock = ledger_with(idle_w=0.0)
    ledger.request_started("fast", "big")
    ledger.request_started("slow", "big")
    ledger.request_started("whole", "big", tracks_tokens=False)
    clock.advance(1.0)
    ledger.progress("fast", 300)
    ledger.progress("slow", 100)
    split = ledger.on_interval("big", measured_j=600.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"fast": 300.0, "slow": 100.0, "whole": 200.0})


def test_a_request_that_ended_keeps_only_its_time_in_the_open_interval():
    """A request marked ended mid-interval is weighted by the time it actually ran."""
    ledger, clock = ledger_with(idle_w=0.0)
    ledger.request_started("short", "big")
    ledger.request_started("long", "big")
    clock.advance(0.25)
    ledger.mark_ended("short")
    clock.advance(0.75)
    split = ledger.on_interval("big", measured_j=500.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"short": 100.0, "long": 400.0})


def test_measured_below_idle_is_all_idle_even_with_requests_in_flight():
    """When the GPUs drew less than the idle power nothing is active, so requests get no energy."""
    ledger, clock = ledger_with(idle_w=100.0)
    ledger.request_started("a", "big")
    clock.advance(1.0)
    ledger.progress("a", 10)
    split = ledger.on_interval("big", measured_j=80.0, dt_s=1.0)
    assert (split.idle_j, split.shares_j) == (80.0, {"a": 0.0})
    assert ledger.totals("big").active_s == 1.0


def test_power_only_interval_is_power_times_dt():
    """Without an energy counter the measured energy is the power times the interval."""
    ledger, _ = ledger_with(idle_w=0.0)
    split = ledger.on_interval("big", measured_j=None, dt_s=0.5, power_w=400.0)
    assert split.measured_j == 200.0
    with pytest.raises(ValueError):
        ledger.on_interval("big", measured_j=None, dt_s=0.5)


def test_learned_idle_is_the_lowest_sustained_one_second_average():
    """Idle is learned from the quietest full second; a brief dip below it is not sustained."""
    ledger, clock = ledger_with(idle_w=None)
    for _ in range(4):                                      # one quiet second at 80 W
        ledger.on_interval("big", measured_j=20.0, dt_s=0.25)
    ledger.request_started("a", "big")
    for tokens, power_w in enumerate((300.0, 50.0, 300.0, 300.0, 300.0), start=1):   # a 0.25 s dip
        ledger.progress("a", tokens)
        split = ledger.on_interval("big", measured_j=power_w * 0.25, dt_s=0.25)
        if power_w == 300.0:
            assert split.idle_j == pytest.approx(80.0 * 0.25)
    assert ledger.totals("big").idle_w_per_gpu == pytest.approx(80.0)


def test_idle_learner_window_forgets_old_seconds():
    """The learned idle power only remembers the last window of 1 s averages."""
    learner = IdleLearner(bucket_s=1.0, window_s=2.0)
    for power_w in (60.0, 90.0, 95.0):
        learner.add(power_w, 1.0)
    assert learner.estimate_w(200.0) == 90.0
    assert learner.estimate_w(70.0) == 70.0


def test_idle_to_active_ratio_is_idle_seconds_per_active_second():
    """Three quiet seconds and one busy second give an idle-to-active ratio of 3."""
    ledger, clock = ledger_with(idle_w=10.0)
    assert ledger.totals("big").idle_to_active_ratio is None
    for _ in range(3):
        clock.advance(1.0)
        ledger.on_interval("big", measured_j=10.0, dt_s=1.0)
    ledger.request_started("a", "big")
    clock.advance(1.0)
    ledger.on_interval("big", measured_j=100.0, dt_s=1.0)
    assert ledger.totals("big").idle_to_active_ratio == 3.0


def test_a_request_that_ended_before_the_interval_does_not_make_it_active():
    """A request waiting only for its books (it ended before the interval began) leaves the interval idle."""
    ledger, clock = ledger_with(idle_w=10.0)
    ledger.request_started("a", "big")
    clock.advance(0.2)
    ledger.mark_ended("a")
    clock.advance(0.05)
    ledger.on_interval("big", measured_j=20.0, dt_s=0.25)
    clock.advance(0.25)
    ledger.on_interval("big", measured_j=2.5, dt_s=0.25)
    totals = ledger.totals("big")
    assert (totals.active_s, totals.idle_s) == (0.25, 0.25)


def test_attributed_plus_idle_equals_measured_across_a_scripted_run():
    """Over a long run with learned idle, requests coming and going, the books balance to the joule."""
    ledger, clock = ledger_with(idle_w=None)
    returned_j = 0.0
    for step in range(400):
        if step % 7 == 0:
            ledger.request_started(f"r{step}", "big")
        for rid in [f"r{s}" for s in range(0, step + 1, 7) if s > step - 40]:
            ledger.progress(rid, (step - int(rid[1:])) * (1 + int(rid[1:]) % 5))
        if step % 7 == 3 and step > 40:
            returned_j += ledger.request_finished(f"r{step - 38}")
        clock.advance(0.25)
        power_w = 70.0 + (step * 37 % 11) * 30.0
        ledger.on_interval("big", measured_j=power_w * 0.25 * 2, dt_s=0.25, n_gpus=2)
    for step in range(0, 400, 7):
        returned_j += ledger.request_finished(f"r{step}")
    totals = ledger.totals("big")
    assert totals.attributed_j > 0 and totals.idle_j > 0
    assert math.isclose(totals.attributed_j + totals.idle_j, totals.measured_j, rel_tol=1e-12)
    assert math.isclose(returned_j, totals.attributed_j, rel_tol=1e-9)


def test_a_request_marked_ended_twice_keeps_the_first_end():
    """Marking a request ended again (its books read after it stopped) does not stretch its time on the GPU."""
    ledger, clock = ledger_with(idle_w=0.0)
    ledger.request_started("a", "big")
    clock.advance(0.5)
    first_s = ledger.mark_ended("a")
    clock.advance(0.5)
    assert ledger.mark_ended("a") == first_s
    ledger.request_started("b", "big")
    split = ledger.on_interval("big", measured_j=100.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"a": 100.0})


def test_a_late_smaller_token_count_does_not_take_tokens_back():
    """Progress is cumulative: a count reported out of order, lower than the last, leaves the request's tokens."""
    ledger, clock = ledger_with(idle_w=0.0)
    for rid in ("a", "b"):
        ledger.request_started(rid, "big")
    clock.advance(1.0)
    ledger.progress("a", 300)
    ledger.progress("a", 200)
    ledger.progress("b", 100)
    split = ledger.on_interval("big", measured_j=400.0, dt_s=1.0)
    assert split.shares_j == pytest.approx({"a": 300.0, "b": 100.0})


def test_a_reload_that_drops_a_configured_idle_power_learns_it_instead():
    """After a reload without `idle_w`, the idle power is learned from the GPUs, not the old configured one kept."""
    ledger, _ = ledger_with(idle_w=100.0)
    ledger.set_idle_w({"big": None})
    ledger.on_interval("big", measured_j=60.0, dt_s=1.0)
    assert ledger.totals("big").idle_w_per_gpu == pytest.approx(60.0)


def test_a_measured_energy_is_booked_rather_than_power_times_dt():
    """Given both the counter's joules and a power sample, the interval books the joules measured."""
    ledger, _ = ledger_with(idle_w=0.0)
    split = ledger.on_interval("big", measured_j=300.0, dt_s=1.0, power_w=500.0)
    assert split.measured_j == 300.0
