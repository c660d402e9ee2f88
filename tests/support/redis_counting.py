"""A real redis-py client that also lists the commands it sends: round trips counted from the client side."""

from __future__ import annotations

from redis.asyncio import Redis


class CountingRedis(Redis):
    """A real Redis client that also lists the commands it sends (a script call is one EVALSHA)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    async def execute_command(self, *args, **options):
        self.sent.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)
