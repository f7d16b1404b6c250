from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import Servers
from ..harness import Mesh


@pytest.fixture
def mesh(servers: Servers) -> Iterator[Mesh]:
    m = Mesh(servers)
    try:
        yield m
    finally:
        m.stop()
