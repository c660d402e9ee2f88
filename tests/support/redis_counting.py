"""A real redis-py client that also lists the commands it sends: round trips counted from the client side."""

from __future__ import annotations

from redis.asyncio import Redis


def counting(client: Redis) -> list[str]:
    """The commands `client` sends from now on (a script call is one EVALSHA), listed as they are sent: for a
    client made elsewhere (a store's own)."""
    sent: list[str] = []
    execute = client.execute_command

    async def execute_command(*args, **options):
        sent.append(str(args[0]).upper())
        return await execute(*args, **options)

    client.execute_command = execute_command
    return sent


class CountingRedis(Redis):
    """A real Redis client that also lists the commands it sends (a script call is one EVALSHA)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent = counting(self)
