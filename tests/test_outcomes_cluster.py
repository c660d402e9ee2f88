"""The shared outcome book against a real 3-master Redis Cluster: each tenant's keys in its own slot."""

from __future__ import annotations

from decimal import Decimal

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.outcomes import AlreadyReported
from gateway.outcomes_redis import RedisOutcomeBook

#: tenants whose hash tags land on different nodes
TENANTS = ("acme", "globex", "initech", "umbrella")


async def test_books_reports_and_stats_across_cluster_nodes(cluster):
    """Tasks of tenants on different nodes are booked by one book, reported once through another, and every
    tenant's stats are read back: the scripts touch only keys of one slot."""
    client = ClusterClient.from_url(cluster.url, socket_timeout=2.0)
    first, second = (RedisOutcomeBook(client, "gw", 2.0, recheck_s=0.01) for _ in range(2))
    try:
        await first.warm_up()
        assert len({client.get_node_from_key(f"gw:{{{tenant}}}:oc:t:job").name for tenant in TENANTS}) > 1
        for index, tenant in enumerate(TENANTS):        # each call priced late, as on measured GPUs
            first.pricing(request_id=f"r{index}", task_id="job", tenant=tenant, for_s=5.0)
            first.track(request_id=f"r{index}", task_id="job", route="chat", tenant=tenant, workflow="triage",
                        cost_usd=Decimal(index + 1) / 10, priced_late=True)
        await first.close()
        assert await client.keys("gw:*:oc:p*") == []        # every pricing mark set, then cleared
        for index, tenant in enumerate(TENANTS):
            task = await second.report({"request_id": f"r{index}", "outcome": "success"}, tenant=tenant,
                                       pricing_s=5.0)
            assert task.cost_usd == Decimal(index + 1) / 10
            with pytest.raises(AlreadyReported):
                await first.report({"task_id": "job", "outcome": "failure"}, tenant=tenant)
        stats = await first.stats()
        assert sorted(stats["tenant"]) == sorted(TENANTS)
        assert (stats["workflow"]["triage"]["tasks"], stats["workflow"]["triage"]["cost_usd"]) == (4, "1")
        assert first.store_failures == second.store_failures == 0
    finally:
        await client.aclose()


async def test_a_booking_the_cluster_client_refuses_costs_no_other_tenant_its_reports(cluster):
    """A tenant name without a usable hash tag (the policy refuses one; here given to the book directly) spreads a
    flush's keys over several slots: that flush is refused and counted, and no back-off follows, so the other
    tenants' reports are answered."""
    client = ClusterClient.from_url(cluster.url, socket_timeout=2.0)
    book = RedisOutcomeBook(client, "gwodd", 2.0, recheck_s=0.01)
    try:
        await book.warm_up()                    # the client knows the slots: it refuses the flush unsent
        book.track(request_id="r1", task_id="job", route="chat", tenant="acme", workflow=None, cost_usd=Decimal(1))
        await book.close()
        book.track(request_id="r2", task_id="job", route="chat", tenant="}odd", workflow=None, cost_usd=Decimal(1))
        await book.close()
        assert book.store_failures == 1 and book.guard.healthy
        assert (await book.report({"task_id": "job", "outcome": "success"}, tenant="acme")).cost_usd == 1
    finally:
        await client.aclose()
