"""Merging the Prometheus expositions of `gateway run --workers N` (gateway.telemetry.peers): every family once,
every worker's samples under it, each labelled with its worker; a worker that cannot be reached is left out and
said so. The end-to-end check with a real Prometheus scraping several workers is in test_workers.py."""

from __future__ import annotations

import asyncio
import errno
import contextlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import peers
from gateway.telemetry.peers import MAX_SOCKET_PATH, WORKER_LABEL, Peers, make_folder, merged


def exposition(requests: int, in_flight: float, latencies: list[float]) -> bytes:
    """A worker's exposition as prometheus_client writes it (the SDK's Prometheus reader writes through it)."""
    registry = CollectorRegistry()
    counter = Counter("gateway_requests", "Requests.", ["gateway_route"], registry=registry)
    counter.labels(gateway_route='chat "default"').inc(requests)
    Gauge("gateway_in_flight", "Requests in flight.", registry=registry).set(in_flight)
    histogram = Histogram("gateway_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry)
    for latency in latencies:
        histogram.observe(latency)
    return generate_latest(registry)


def samples(text: bytes) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}, failing on a sample written twice (Prometheus rejects that)."""
    found: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} twice"
            found[key] = sample.value
    return found


def test_every_workers_samples_are_kept_each_labelled_with_its_worker():
    """Two workers' counters, gauges and histograms (label values with quotes and spaces among them): each
    sample of each is in the merge once, with its value, labelled with its worker's slot."""
    first, second = exposition(3, 2, [0.05, 0.5]), exposition(5, 0, [2.0])
    together = samples(merged([(0, first), (1, second)]))
    expected = {}
    for slot, text in ((0, first), (1, second)):
        for (name, labels), value in samples(text).items():
            expected[(name, tuple(sorted((*labels, (WORKER_LABEL, str(slot))))))] = value
    assert together == expected
    assert together[("gateway_requests_total", (("gateway_route", 'chat "default"'), (WORKER_LABEL, "1")))] == 5
    assert together[("gateway_in_flight", ((WORKER_LABEL, "0"),))] == 2


def test_each_family_is_described_once_with_its_samples_together():
    """HELP and TYPE once per family, each family's samples right after them: a family split in two, or
    described twice, is an exposition Prometheus refuses."""
    text = merged([(0, exposition(1, 1, [0.5])), (1, exposition(2, 0, [0.5])), (2, exposition(0, 3, []))]).decode()
    lines = text.splitlines()
    helps = [line.split()[2] for line in lines if line.startswith("# HELP")]
    assert sorted(helps) == sorted(set(helps)) and "gateway_latency_seconds" in helps
    family_of_line = []
    current = None
    for line in lines:
        if line.startswith("# HELP"):
            current = line.split()[2]
        elif not line.startswith("#"):
            family_of_line.append(current)
    runs = [family for i, family in enumerate(family_of_line) if i == 0 or family_of_line[i - 1] != family]
    assert len(runs) == len(set(runs))


def test_each_family_keeps_its_help_and_type_in_the_merge():
    """Every family's HELP and TYPE lines come through: without its TYPE, Prometheus takes a counter or a
    histogram for untyped series."""
    one = exposition(1, 1, [0.5])
    text = merged([(0, one), (1, exposition(2, 0, [2.0]))])
    described = {(family.name, family.type, family.documentation) for family in text_string_to_metric_families(
        text.decode())}
    assert described == {(family.name, family.type, family.documentation)
                         for family in text_string_to_metric_families(one.decode())}
    assert ("gateway_latency_seconds", "histogram", "Latency.") in described


def test_comments_lead_and_an_empty_worker_adds_nothing():
    text = merged([(0, exposition(1, 0, [])), (1, b"")], ["# gateway_worker 2 left out of this scrape: gone"])
    assert text.startswith(b"# gateway_worker 2 left out")
    assert not any(WORKER_LABEL + '="1"' in line for line in text.decode().splitlines())
    assert merged([(0, b"")]) == b""


def test_the_merge_ends_its_last_line_with_a_line_feed():
    """The text format ends every line, the last one too, with a line feed: a strict scraper refuses an
    exposition whose last sample is cut off at the end of the body."""
    text = merged([(0, exposition(1, 0, [])), (1, exposition(2, 1, [0.5]))])
    assert text.endswith(b"\n") and not text.endswith(b"\n\n")
    assert merged([(0, b"")], ["# gateway_worker 1 left out of this scrape: gone"]).endswith(b"gone\n")


def test_a_scrape_gathers_the_workers_that_answer_and_names_the_one_that_does_not(tmp_path):
    """Worker 0 is scraped: worker 1 answers on its socket, worker 2 has none (restarting). The scrape has
    worker 0's and worker 1's series and a comment saying worker 2 was left out."""

    async def scrape() -> bytes:
        peers = [Peers(tmp_path, slot, 3) for slot in range(3)]
        app = web.Application()
        async with contextlib.AsyncExitStack() as stack:
            serving = peers[1].serving(lambda: exposition(7, 1, []))(app)
            await serving.__anext__()
            stack.push_async_callback(lambda: anext(serving, None))
            assert peers[1].socket_path(1).exists()
            return await peers[0].gather(exposition(4, 0, []))

    text = asyncio.run(scrape())
    found = samples(text)
    assert found[("gateway_requests_total", (("gateway_route", 'chat "default"'), (WORKER_LABEL, "0")))] == 4
    assert found[("gateway_requests_total", (("gateway_route", 'chat "default"'), (WORKER_LABEL, "1")))] == 7
    assert not any((WORKER_LABEL, "2") in labels for _, labels in found)
    assert text.startswith(b"# gateway_worker 2 left out of this scrape: it cannot be reached")


def test_a_tmpdir_too_long_for_a_socket_path_falls_back_to_tmp(tmp_path, monkeypatch):
    """A TMPDIR so long that `SLOT.sock` in a folder there would pass the 107 bytes a Unix socket path may have:
    the folder is made in /tmp instead (it was made there anyway, and every worker failed to serve its series)."""
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = make_folder(4)
    try:
        assert folder is not None and folder.parent == Path("/tmp") and folder.stat().st_mode & 0o777 == 0o700
        assert len(str(Peers(folder, 3, 4).socket_path(3))) <= MAX_SOCKET_PATH
    finally:
        folder.rmdir()
    assert not list(deep.iterdir())                     # the folder tried first is gone
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    short = make_folder(2)
    assert short is not None and short.parent == Path("/tmp")
    short.rmdir()


def test_a_worker_makes_the_folder_again_when_the_last_one_out_took_it(tmp_path):
    """Every worker stopped at once (a crash loop) and the last one out removed the folder: the replacement
    makes it again, mode 0700, and serves its series there; a folder open to others is refused."""
    folder = tmp_path / "gone"

    async def start_and_stop() -> bool:
        serving = Peers(folder, 0, 2).serving(lambda: exposition(1, 0, []))(web.Application())
        await serving.__anext__()
        served = Peers(folder, 0, 2).socket_path(0).exists()
        await anext(serving, None)
        return served

    assert asyncio.run(start_and_stop()) and not folder.exists()
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    assert not asyncio.run(start_and_stop())            # refused: said in the log, the worker serves on


def test_no_temporary_folder_at_all_is_said_not_fatal(monkeypatch, caplog):
    """No temporary folder can be made (a read-only root without a /tmp mount): the workers run without one,
    said once, rather than the gateway failing to start."""
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert make_folder(2) is None
    assert "no private folder for the workers (none can be made: Read-only file system)" in caplog.text


def scrape_with_peer(folder: Path, peer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> bytes:
    """Worker 0 of 3 scraped: worker 1 answers with `peer` on its socket, worker 2 serves its series as usual."""

    async def scrape() -> bytes:
        app = web.Application()
        app.router.add_get("/metrics", peer)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.UnixSite(runner, str(Peers(folder, 1, 3).socket_path(1))).start()
        serving = Peers(folder, 2, 3).serving(lambda: exposition(9, 0, []))(web.Application())
        await serving.__anext__()
        try:
            return await Peers(folder, 0, 3).gather(exposition(4, 0, []))
        finally:
            await anext(serving, None)
            await runner.cleanup()

    return asyncio.run(scrape())


def test_a_worker_answering_an_error_is_left_out_and_named_with_its_status(tmp_path):
    """A worker that answers 500 (its exposition failed) is left out, said so: its error page is no series."""

    async def failing(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="gateway_requests_total 12345\n")

    text = scrape_with_peer(tmp_path, failing)
    assert text.startswith(b"# gateway_worker 1 left out of this scrape: it answered 500\n")
    found = samples(text)
    assert not any((WORKER_LABEL, "1") in labels for _, labels in found)
    assert found[("gateway_requests_total", (("gateway_route", 'chat "default"'), (WORKER_LABEL, "2")))] == 9


def test_a_worker_that_does_not_answer_in_time_is_left_out_and_the_scrape_goes_on(tmp_path, monkeypatch):
    """A stuck worker holds a scrape no longer than PEER_TIMEOUT_S: the others' series come, it is named."""
    monkeypatch.setattr(peers, "PEER_TIMEOUT_S", 0.2)

    async def stuck(_request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(body=exposition(1, 0, []))

    text = scrape_with_peer(tmp_path, stuck)
    assert text.startswith(b"# gateway_worker 1 left out of this scrape: no answer within 0.2 s\n")
    found = samples(text)
    assert ("gateway_requests_total", (("gateway_route", 'chat "default"'), (WORKER_LABEL, "2"))) in found
    assert not any((WORKER_LABEL, "1") in labels for _, labels in found)


def test_a_scrape_lists_the_workers_samples_in_slot_order_whichever_worker_it_reached():
    """Worker 2 answers the scrape: each family's samples still come worker 0, 1, 2, so scrapes read alike."""

    async def scrape(folder: Path) -> bytes:
        async with contextlib.AsyncExitStack() as stack:
            for slot in (0, 1):
                serving = Peers(folder, slot, 3).serving(lambda slot=slot: exposition(slot, 0, []))(web.Application())
                await serving.__anext__()
                stack.push_async_callback(lambda serving=serving: anext(serving, None))
            return await Peers(folder, 2, 3).gather(exposition(2, 0, []))

    with tempfile.TemporaryDirectory() as folder:
        text = asyncio.run(scrape(Path(folder)))
    requests = [line for line in text.decode().splitlines() if line.startswith("gateway_requests_total")]
    assert [line.split(WORKER_LABEL + '="')[1][0] for line in requests] == ["0", "1", "2"]
