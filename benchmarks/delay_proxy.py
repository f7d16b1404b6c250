"""A TCP proxy that delays every byte by a fixed time in each direction, like a link with a
round trip of twice that:

    python benchmarks/delay_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_S
        [--stats FILE]

Data is forwarded in order and without a throughput limit: each chunk read is written out
once the delay has passed from the moment it was read, so many requests can be in flight on
one connection, as on a real link. It prints `ready` once it listens.

It stands for a network link, which costs the machine it serves no CPU, so it is built to
cost as little as it can: one asyncio loop, protocol callbacks instead of streams, and one
timer per direction for whatever is on its way (not one per chunk). Nothing pushes back on
a fast sender (as on a link with room to spare): a benchmark's traffic is bounded.

How faithful the link is:
- A timer of the loop wakes late: epoll counts whole milliseconds, and this VM's kernel
  wakes 0.1-0.2 ms after the time asked. A chunk went out up to 0.4 ms after it was due
  (mostly 0.1-0.3 ms) on an idle machine, and a round trip of 2 x 5 ms took 10.8-11.1 ms
  here (ping-pong of 100 bytes through an echo server behind the proxy; 0.23 ms with no
  delay).
- A link does not wait for a core; this proxy shares the machine's cores with a
  benchmark's workers and etcd, and may wait longer the more workers run. With
  `--stats FILE`, each SIGUSR1 writes to FILE how late the bytes so far went out against
  their due time, in 0.1 ms steps, with a sequence number: `{"seq": N, "bins": {"STEP":
  BYTES, ...}}` (`late_stats` reads it). A chunk is due its delay after the proxy read it:
  time it spent in the kernel's buffer before that (the proxy waiting for a core, say) is
  not in these figures, which cover the timer's side only. scale_workers.py reports them,
  and the proxy's wait for a core from /proc (its schedstat), for every run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import signal
from pathlib import Path

# how late the bytes went out, in 0.1 ms steps: {step: bytes}
LATE: collections.Counter[int] = collections.Counter()


class Link:
    """One proxied connection: two directions, each delayed on its own. A direction ends
    when what was read before its reader's EOF has been written and the EOF passed on
    (half-close), or when the socket it writes to is gone; both ended, both sockets close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.up = Direction(self, loop, delay)  # client to upstream
        self.down = Direction(self, loop, delay)  # upstream to client

    def check(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def close(self) -> None:
        for d in (self.up, self.down):
            d.done = True
            if d.out is not None:
                d.out.close()  # after what is still in its buffer


class Direction:
    """What one socket read, each chunk with the loop time it may be written at, and the
    transport it goes to (None until the upstream connection is made)."""

    def __init__(self, link: Link, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.link = link
        self.loop = loop
        self.delay = delay
        self.out: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False  # the reading socket sent EOF: pass it on after the data
        self.done = False

    def push(self, data: bytes) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        if self.timer is None and self.out is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def end(self) -> None:
        self.eof = True
        if self.timer is None:
            self.flush()

    def lost(self) -> None:
        """The socket this direction writes to is gone: what is on its way cannot arrive."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.done = True
        self.link.check()

    def attach(self, out: asyncio.Transport) -> None:
        self.out = out
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        elif self.eof:
            self.flush()

    def flush(self) -> None:
        self.timer = None
        if self.out is None or self.done:
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            due, data = self.queue.popleft()
            LATE[math.floor((now - due) * 10_000)] += len(data)
            self.out.write(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)
        elif self.eof:
            self.done = True
            if self.out.can_write_eof():
                self.out.write_eof()
            self.link.check()


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into *inbound*, *outbound*
    writes to it."""

    def __init__(self, inbound: Direction, outbound: Direction) -> None:
        self.inbound = inbound
        self.outbound = outbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.outbound.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.inbound.push(data)

    def eof_received(self) -> bool:
        self.inbound.end()
        return True  # keep the socket open: the other direction may still have data for it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.inbound.eof:
            self.inbound.end()
        self.outbound.lost()


def late_stats(path: Path) -> tuple[int, collections.Counter[int]]:
    """(sequence number, histogram) of a stats file; seq 0 before the first."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, collections.Counter()
    return raw["seq"], collections.Counter({int(k): v for k, v in raw["bins"].items()})


def late_ms(bins: collections.Counter[int], q: float) -> float | None:
    """The *q* quantile (0..1) of a lateness histogram, in ms, at the upper end of its 0.1
    ms step (0.5 means 0.4-0.5 ms); None if the histogram is empty."""
    total, seen = sum(bins.values()), 0
    for step in sorted(bins):
        seen += bins[step]
        if seen >= q * total:
            return (step + 1) / 10
    return None


async def main(listen: int, upstream: int, delay: float, stats: Path | None) -> None:
    loop = asyncio.get_running_loop()
    if stats is not None:
        seq = [0]

        def dump() -> None:
            seq[0] += 1
            tmp = stats.with_name(stats.name + ".tmp")
            tmp.write_text(json.dumps({"seq": seq[0], "bins": LATE}))
            tmp.replace(stats)

        loop.add_signal_handler(signal.SIGUSR1, dump)
    connecting: set[asyncio.Task[None]] = set()  # held, or the loop may drop them unfinished

    def accept() -> Side:
        link = Link(loop, delay)
        client = Side(link.up, link.down)

        async def connect() -> None:
            try:
                await loop.create_connection(
                    lambda: Side(link.down, link.up), "127.0.0.1", upstream
                )
            except OSError:
                link.close()

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    ap.add_argument("listen", type=int)
    ap.add_argument("upstream", type=int)
    ap.add_argument("delay", type=float, help="seconds each way")
    ap.add_argument("--stats", type=Path, help="where SIGUSR1 writes the lateness so far")
    args = ap.parse_args()
    asyncio.run(main(args.listen, args.upstream, args.delay, args.stats))
