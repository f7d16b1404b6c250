"""A TCP proxy that delays every byte by a fixed time in each direction, like a link with a
round trip of twice that: `python benchmarks/delay_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_S`.

Data is forwarded in order and without a throughput limit: each chunk read waits out the
delay from the moment it was read, so many requests can be in flight on one connection, as
on a real link. It prints `ready` once it listens. One asyncio loop, so it costs little CPU.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = asyncio.Event()
    closed = False

    async def send() -> None:
        while True:
            await ready.wait()
            while queue:
                when, data = queue[0]
                wait = when - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                queue.popleft()
                writer.write(data)
                await writer.drain()
            ready.clear()
            if closed:
                writer.close()
                return

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            queue.append((loop.time() + delay, data))
            ready.set()
    except (ConnectionError, OSError):
        pass
    closed = True
    ready.set()
    with contextlib.suppress(ConnectionError, OSError):
        await sender


async def main(listen: int, upstream: int, delay: float) -> None:
    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(forward(creader, uwriter, delay), forward(ureader, cwriter, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
