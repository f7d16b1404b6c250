"""A TCP proxy that delays every byte by a fixed time in each direction, like a link with a
round trip of twice that: `python benchmarks/delay_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_S`.

Data is forwarded in order and without a throughput limit: each chunk read is written out
once the delay has passed from the moment it was read, so many requests can be in flight on
one connection, as on a real link. It prints `ready` once it listens.

It stands for a network link, which costs the machine it serves no CPU, so it is built to
cost as little as it can: one asyncio loop, protocol callbacks instead of streams, and one
timer per direction for whatever is on its way (not one per chunk).
"""

from __future__ import annotations

import asyncio
import collections
import sys


class Direction:
    """One direction of one connection: what was read, each chunk with the loop time it may
    be written at, and the transport it goes to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.out: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False

    def push(self, data: bytes) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None and self.out is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def close_after(self) -> None:
        """Close the other side once everything read before this has been written."""
        self.closing = True
        if self.timer is None:
            self.flush()

    def attach(self, out: asyncio.Transport) -> None:
        self.out = out
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        elif self.closing:
            out.close()

    def flush(self) -> None:
        self.timer = None
        if self.out is None:
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            self.out.write(self.queue.popleft()[1])
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        elif self.closing:
            self.out.close()


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into *inbound*; when it closes,
    the other socket closes after the data still on its way."""

    def __init__(self, inbound: Direction, outbound: Direction) -> None:
        self.inbound = inbound
        self.outbound = outbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.outbound.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.inbound.push(data)

    def eof_received(self) -> bool:
        self.inbound.close_after()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbound.close_after()


async def main(listen: int, upstream: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # held, or the loop may drop them unfinished

    def accept() -> Side:
        up, down = Direction(loop, delay), Direction(loop, delay)
        client = Side(up, down)

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: Side(down, up), "127.0.0.1", upstream)
            except OSError:
                down.close_after()
                up.out = None

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
