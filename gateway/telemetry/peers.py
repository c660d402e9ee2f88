"""`/metrics` under `gateway run --workers N`: each scrape gathers every worker's series.

The kernel hands a scrape to any one worker, and each worker keeps its own counters: answered alone, a scraper
would see the counters go back and forth from one scrape to the next. So the supervisor makes a private folder
(mode 0700) before it forks; each worker also serves its own exposition on a Unix socket there (`SLOT.sock`, GET
/metrics and nothing else), and the worker a scrape reaches asks every other one at once, then merges: each
family's HELP and TYPE once, every worker's samples under it, each labelled `gateway_worker="SLOT"` (the slot
stays with a restarted worker, whose counters start again from 0: a reset Prometheus's `rate` handles). A
worker that does not answer within PEER_TIMEOUT_S (starting, restarting, stuck) is left out of that scrape, as
a comment line says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR

import aiohttp
from aiohttp import web

log = logging.getLogger("gateway")

#: the label every sample of a merged scrape carries: the slot of the worker it comes from
WORKER_LABEL = "gateway_worker"
#: how long a scrape waits for another worker's series
PEER_TIMEOUT_S = 5.0
#: the longest path a Unix socket may have on Linux (sun_path, less its closing NUL)
MAX_SOCKET_PATH = 107


def make_folder(workers: int) -> Path | None:
    """The workers' private folder (mode 0700) under TMPDIR, or /tmp when TMPDIR is too long for a socket path
    in it; None, said once, when neither will do (or no temporary folder can be made at all)."""
    try:
        for parent in (None, "/tmp"):
            folder = Path(tempfile.mkdtemp(prefix="gateway-workers-", dir=parent))
            if len(os.fsencode(Peers(folder, 0, workers).socket_path(workers - 1))) <= MAX_SOCKET_PATH:
                return folder
            folder.rmdir()
        why = "none short enough for a socket path in TMPDIR or /tmp"
    except OSError as exc:
        why = f"none can be made: {exc.strerror or exc}"
    log.warning("%d workers: no private folder for the workers (%s): each scrape of /metrics is answered by one "
                "worker with its own series, and without Redis each worker books the whole energy of the GPUs it "
                "samples", workers, why)
    return None


def own_folder(folder: Path) -> None:
    """The workers' folder, made again (mode 0700) when it is gone; anything else at its path (a symbolic link, a
    folder that is not this user's alone) is refused. Made under a sticky TMPDIR, a folder of this user's cannot
    be swapped by another user once it is there."""
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        stat = folder.lstat()
        if not S_ISDIR(stat.st_mode) or stat.st_uid != os.getuid() or stat.st_mode & 0o077:
            raise PermissionError(f"{folder} is not a folder of this user's alone") from None


@dataclass(frozen=True)
class Peers:
    """This worker's slot among `workers`, and their private folder: their exposition sockets (`metrics`), and
    their GPU energy words when they have no Redis (`gateway.energy.sharing.FolderSharing`)."""

    folder: Path
    slot: int
    workers: int
    metrics: bool = True            # Prometheus is on: serve this worker's series, gather the others'

    def socket_path(self, slot: int) -> Path:
        return self.folder / f"{slot}.sock"

    def serving(self, exposition: Callable[[], bytes]) -> Callable[[web.Application], AsyncIterator[None]]:
        """A cleanup context serving this worker's own exposition (`exposition()`, made in a thread) on its
        socket, for as long as the app runs."""

        async def own(_request: web.Request) -> web.Response:
            return web.Response(body=await asyncio.to_thread(exposition))

        async def serve(_app: web.Application) -> AsyncIterator[None]:
            app = web.Application()
            app.router.add_get("/metrics", own)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            path = self.socket_path(self.slot)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()               # left by the worker this one replaces
            try:
                own_folder(self.folder)     # the last worker out took it, when all stopped at once
                await web.UnixSite(runner, str(path)).start()
            except OSError as exc:
                log.warning("worker %d cannot serve its metrics to the other workers (%s): scrapes reaching "
                            "them leave its series out", self.slot, exc.strerror or exc)
            try:
                yield
            finally:
                await runner.cleanup()
                with contextlib.suppress(OSError):
                    path.unlink()
                with contextlib.suppress(OSError):  # the last worker out takes the folder (a parent killed by
                    self.folder.rmdir()             # SIGKILL cannot); with others' sockets still in it, it stays

        return serve

    async def gather(self, own: bytes) -> bytes:
        """This worker's exposition `own` merged with every other worker's."""
        slots = [slot for slot in range(self.workers) if slot != self.slot]
        answers = await asyncio.gather(*(self._ask(slot) for slot in slots))
        expositions = [(self.slot, own)]
        missing = []
        for slot, answer in zip(slots, answers):
            if isinstance(answer, bytes):
                expositions.append((slot, answer))
            else:
                missing.append(f"# {WORKER_LABEL} {slot} left out of this scrape: {answer}")
        return await asyncio.to_thread(merged, sorted(expositions), missing)

    async def _ask(self, slot: int) -> bytes | str:
        """Worker `slot`'s exposition, or why there is none."""
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(self.socket_path(slot))),
                                             timeout=timeout) as session:
                async with session.get("http://worker/metrics") as response:
                    if response.status != 200:
                        return f"it answered {response.status}"
                    return await response.read()
        except asyncio.TimeoutError:
            return f"no answer within {PEER_TIMEOUT_S:g} s"
        except aiohttp.ClientError as exc:
            return f"it cannot be reached ({type(exc).__name__})"


def merged(expositions: list[tuple[int, bytes]], comments: list[str] = ()) -> bytes:
    """One exposition of several workers' (slot, text): each family's HELP and TYPE once, in the order first
    seen, then every worker's samples of it, each labelled with its worker's slot; `comments` first."""
    families: dict[str | None, tuple[list[str], list[str]]] = {}
    for slot, text in expositions:
        label = f'{WORKER_LABEL}="{slot}"'
        for name, heads, samples in _families(text.decode("utf-8", "replace"), label):
            families.setdefault(name, (heads, []))[1].extend(samples)
    lines = list(comments)
    for heads, samples in families.values():
        lines += heads
        lines += samples
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _families(text: str, label: str) -> Iterator[tuple[str | None, list[str], list[str]]]:
    """(family name, its HELP and TYPE lines, its samples with `label` added first) of one text exposition."""
    name: str | None = None
    heads: list[str] = []
    samples: list[str] = []
    for line in text.split("\n"):   # not splitlines(): a label value may hold U+2028, U+001C and the like
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if parts[2] != name:
                    if heads or samples:
                        yield name, heads, samples
                    name, heads, samples = parts[2], [], []
                heads.append(line)
            continue
        samples.append(_labelled(line, label))
    if heads or samples:
        yield name, heads, samples


def _labelled(sample: str, label: str) -> str:
    """A sample line with `label` first among its labels (a metric name holds no brace or space)."""
    brace, space = sample.find("{"), sample.find(" ")
    if space == -1:
        return sample                       # no value: not a sample, passed on as it came
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1:]
        return f"{sample[:brace + 1]}{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


#: the app's Peers, when it is one of `gateway run --workers N`
PEERS = web.AppKey("peers", Peers)
