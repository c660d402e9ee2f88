"""Per-request SLA tightening from `x-gateway-*` headers: how a header's value is read."""

from __future__ import annotations

import pytest

from gateway.errors import NoModelMeetsSla
from gateway.policy.model import Sla
from gateway.routing import tighten_from_headers
from tests.test_routing_planner import Setup, chat_route


def test_a_negative_zero_cost_header_is_read_as_zero_without_its_sign():
    """x-gateway-max-cost-usd -0 is the ceiling 0: the refusal names `max_cost_usd 0` and `$0`, never `-0`."""
    tighten = tighten_from_headers({"x-gateway-max-cost-usd": "-0"})
    assert not tighten.max_cost_usd.is_signed()
    assert tighten.as_dict() == {"max_cost_usd": 0.0} and str(tighten.as_dict()["max_cost_usd"]) == "0.0"
    setup = Setup(chat_route(Sla(on_violation="reject"), candidates=("small",)))
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide(tighten=tighten)
    assert caught.value.message == "no model of route 'chat' meets max_cost_usd 0: small: cost $0.0000306 > $0"
