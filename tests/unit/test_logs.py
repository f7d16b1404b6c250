"""kvmesh's log format: one line per record, whatever the record carries."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from pipeline.protocol.logs import FORMAT, LineBudget, OneLineFormatter


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logger = logging.getLogger("kvmesh.test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def test_a_message_from_outside_stays_on_its_line(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logged
    logger.error("rejected task %s", "id\nforged: line\x1b[31m")
    assert stream.getvalue().splitlines()[-1].endswith("rejected task id\\x0aforged: line\\x1b[31m")
    assert len(stream.getvalue().splitlines()) == 1


def test_no_line_of_a_traceback_passes_for_a_record(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """An exception's text can come from outside (a content type in a decoding error): the
    traceback keeps its lines, each escaped and indented, so only the record's first line
    starts at the margin."""
    logger, stream = logged
    try:
        raise ValueError("content type 'x\n2026-11-29 00:00:00 ERROR forged: line\x1b[31m'")
    except ValueError:
        logger.exception("cannot decode task %s", "t\n1")
    logger.info("where from", stack_info=True)
    lines = stream.getvalue().splitlines()
    records = [line for line in lines if not line.startswith("\t")]
    assert len(records) == 2
    assert records[0].endswith("cannot decode task t\\x0a1")
    assert records[1].endswith("where from")
    assert "\t2026-11-29 00:00:00 ERROR forged: line\\x1b[31m'" in lines


def test_a_line_budget_holds_back_what_goes_over_and_says_it_once() -> None:
    now = [0.0]
    budget = LineBudget(2, 60.0, lambda: now[0])
    assert [budget.take("layout") for _ in range(5)] == [True, True, False, False, False]
    assert budget.take("value_too_large")  # each kind has its own
    now[0] = 59.0
    assert not budget.take("layout")
    assert budget.overdue() == []  # its window is not over
    now[0] = 61.0
    assert budget.overdue() == [("layout", 4, 61.0)]
    assert budget.overdue() == []  # said once
    assert budget.take("layout")  # a new window
