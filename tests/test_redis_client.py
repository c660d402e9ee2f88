"""The stores' Redis client (gateway.stores.redis_client) against a real redis-server: what it sends, how a
frozen Redis bounds it, and that a URL's choice of TLS or a Unix socket is kept."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from gateway.store_guard import STORE_DOWN, StoreGuard
from gateway.stores import redis_client

#: commands of each shape the stores send: several words in the name, bytes, ints, floats, empty and non-ASCII texts
COMMANDS = [
    ("SCRIPT LOAD", "return 1"),
    ("EVALSHA", "b82277198e39781e8bf31d6f521b8d5945e66369", 4, "gw:{alpha}:rl:req", "", 60000, 1.5, -0.25, 1 / 3),
    ("SET", "gw:c:v2:key", b"\x00\xff\r\n{\"a\": 1}", "EX", 300),
    ("HINCRBY", "gw:{é}:oc", "cost_pusd", 12345678901234567),
]


@pytest.mark.parametrize("url, plain", [
    ("redis://127.0.0.1:6399/0", aioredis.Connection),
    ("rediss://127.0.0.1:6399/0", aioredis.SSLConnection),
    ("unix:///run/redis.sock?db=2", aioredis.UnixDomainSocketConnection),
])
async def test_the_client_sends_what_redis_pys_own_packer_sends_over_the_connection_the_url_chose(url, plain):
    """Commands are packed in C, byte for byte as redis-py's asyncio packer writes them; a rediss:// URL still
    connects over TLS and a unix:// one over its socket (with the URL's db)."""
    client = redis_client(url, 0.5, 4, cluster=False)
    try:
        pool = client.connection_pool
        assert issubclass(pool.connection_class, plain)
        connection, reference = pool.make_connection(), plain(**pool.connection_kwargs)
        for command in COMMANDS:
            assert b"".join(connection.pack_command(*command)) == b"".join(reference.pack_command(*command))
        if plain is aioredis.UnixDomainSocketConnection:
            assert (connection.path, connection.db) == ("/run/redis.sock", 2)
    finally:
        await client.aclose()


@pytest.mark.parametrize("url", [
    "redis://user:secret@127.0.0.1:6399/3?health_check_interval=5&socket_timeout=0.3",
    "rediss://127.0.0.1:6399/0?ssl_cert_reqs=none",
])
async def test_a_urls_own_options_win_as_redis_pys_from_url_lets_them(url):
    """Options in the URL (its db, credentials, a health check interval, TLS settings, even a socket timeout)
    override the client's defaults exactly as `Redis.from_url` lets them: the pool is configured the same."""
    client = redis_client(url, 0.5, 4, cluster=False)
    reference = aioredis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=0.5, max_connections=4)
    try:
        settings = [{key: repr(value) for key, value in c.connection_pool.connection_kwargs.items()
                     if key not in ("retry", "himport_registry", "maint_notifications_pool_handler")}
                    for c in (client, reference)]
        assert settings[0] == settings[1]
        assert client.connection_pool.max_connections == 4
    finally:
        await client.aclose()
        await reference.aclose()


async def test_a_value_redis_cannot_take_is_refused_as_redis_py_refuses_it(redis_server):
    """None is no Redis value: redis-py's DataError (a RedisError, which the guard counts), nothing sent."""
    client = redis_client(redis_server.url, 0.5, 4, cluster=False)
    try:
        with pytest.raises(DataError):
            await client.set("gw:none", None)
        assert await client.get("gw:none") is None
    finally:
        await client.aclose()


async def test_a_call_to_a_frozen_redis_ends_at_the_guards_timeout_and_leaves_no_reply_behind(redis_server):
    """The client sets no socket timeout of its own: the StoreGuard bounds each call. Redis frozen (SIGSTOP), a
    read gives the guard's default at its timeout; the connection it was cut from is not reused with its reply
    still on the way: once Redis resumes, the next read on the one-connection pool gets its own value."""
    client = redis_client(redis_server.url, 0.2, 1, cluster=False)
    guard = StoreGuard("test store", 0.2, backoff_s=0.0)
    try:
        await client.set("gw:first", b"first")
        await client.set("gw:second", b"second")
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            assert await asyncio.wait_for(guard.run(lambda: client.get("gw:first")), 5) is STORE_DOWN
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert guard.failures == 1
        assert await asyncio.wait_for(client.get("gw:second"), 5) == b"second"
    finally:
        await client.aclose()


async def test_a_command_whose_reply_was_lost_is_not_sent_again(redis_server):
    """Redis ran a command but its connection dropped before the reply came: the client raises instead of sending
    it again on a new connection, so an increment (an admission, a charge) is applied once, not twice."""
    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Relay to Redis; once an INCR has gone through, drop the connection instead of relaying its reply."""
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", redis_server.port)
        cut = []

        async def commands() -> None:
            while data := await client_r.read(65536):
                if b"INCR" in data.upper():
                    cut.append(data)
                redis_w.write(data)
                await redis_w.drain()

        async def replies() -> None:
            while data := await redis_r.read(65536):
                if cut:
                    break
                client_w.write(data)
                await client_w.drain()
            client_w.close()
            redis_w.close()

        await asyncio.gather(commands(), replies(), return_exceptions=True)

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    client = redis_client(f"redis://127.0.0.1:{port}/0", 0.5, 4, cluster=False)
    direct = aioredis.Redis.from_url(redis_server.url)
    try:
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(client.incr("gw:applied"), 5)
        assert await direct.get("gw:applied") == b"1"
    finally:
        await client.aclose()
        await direct.aclose()
        proxy.close()
