"""Picking ports for the servers the lab, the tests and the benchmarks start."""

from __future__ import annotations

import pytest

from pipeline.tools import servers


class _Picks:
    """A random.Random that picks the given ports, in order."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def randrange(self, _low: int, _high: int) -> int:
        return self.ports.pop(0)


def test_a_reserved_port_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port given to the lab for its Prometheus (picked by the test that runs it) is free
    until Prometheus binds it: the lab must not give it to one of its etcds first, as it
    once did (Prometheus then exited with `address already in use`)."""
    a, b = servers.free_port(), servers.free_port()  # two free ports, handed out here
    servers._handed_out.difference_update({a, b})
    servers.reserve(a)
    monkeypatch.setattr(servers.random, "Random", lambda: _Picks([a, b]))
    assert servers.free_port() == b
