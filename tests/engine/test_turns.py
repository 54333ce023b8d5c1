"""Engine turns (engine/turns.py): who runs the next step. Real threads; a test clock decides what has
waited a quantum; each test waits on the turns' own state (a step queued), never on time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from nmt.engine.turns import EngineTurns

QUANTUM = 0.05


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state another thread reaches (bounded generously: a failure, not a race)."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.001)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def turns(clock: Clock) -> EngineTurns:
    return EngineTurns(QUANTUM, clock)


def queue_step(turns: EngineTurns, name: str, rows: int, order: list[str]) -> threading.Thread:
    """Another model's single step of `rows` rows, started and seen waiting for the turn."""
    waiting = turns.waiting

    def run() -> None:
        with turns.step(rows):
            order.append(name)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    until(lambda: turns.waiting == waiting + 1, f"{name} waiting for the turn")
    return thread


def test_a_step_alone_runs_at_once_and_gives_the_turn_back(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.step(8):
        order.append("first")
    with turns.step(8):  # the turn was given back: no wait
        order.append("second")
    assert order == ["first", "second"] and turns.waiting == 0


def test_a_search_keeps_the_turn_between_its_steps(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(100):
            order.append("search 1")
        other = queue_step(turns, "other", 100, order)  # as large: waits for the search or a quantum
        with turns.step(100):
            order.append("search 2")
    other.join(timeout=30)
    assert order == ["search 1", "search 2", "other"]


def test_a_clearly_smaller_step_passes_a_large_search(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(128):
            order.append("batch 1")
        small = queue_step(turns, "request", 4, order)
        with turns.step(128):  # gives the turn to the small step first
            order.append("batch 2")
    small.join(timeout=30)
    assert order == ["batch 1", "request", "batch 2"]


def test_a_step_waiting_a_quantum_gets_the_next_turn(turns: EngineTurns, clock: Clock) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(4):
            order.append("search 1")
        other = queue_step(turns, "large", 128, order)
        with turns.step(4):  # the large step has not waited a quantum yet
            order.append("search 2")
        clock.now += QUANTUM * 1.01
        with turns.step(4):
            order.append("search 3")
    other.join(timeout=30)
    assert order == ["search 1", "search 2", "large", "search 3"]


def test_a_freed_turn_goes_to_the_smallest_waiting_step(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(1):
            order.append("holder")
        threads = [queue_step(turns, "rows 64", 64, order), queue_step(turns, "rows 8", 8, order),
                   queue_step(turns, "rows 16", 16, order)]
    for thread in threads:
        thread.join(timeout=30)
    assert order == ["holder", "rows 8", "rows 16", "rows 64"]


def test_steps_that_waited_a_quantum_go_first_oldest_first(turns: EngineTurns, clock: Clock) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(1):
            order.append("holder")
        old = [queue_step(turns, "old 64", 64, order)]
        clock.now += QUANTUM / 2
        old.append(queue_step(turns, "old 32", 32, order))
        clock.now += QUANTUM * 1.01
        young = queue_step(turns, "young 4", 4, order)
    for thread in (*old, young):
        thread.join(timeout=30)
    assert order == ["holder", "old 64", "old 32", "young 4"]


def test_a_wait_is_reported(clock: Clock) -> None:
    waits: list[float] = []
    turns = EngineTurns(QUANTUM, clock, on_wait=waits.append)
    order: list[str] = []
    with turns.hold():
        with turns.step(4):
            order.append("holder")
        other = queue_step(turns, "other", 4, order)
        clock.now += 0.02
    other.join(timeout=30)
    assert waits == [pytest.approx(0.02)]  # the holder's own steps never waited


def test_quantum_must_be_positive() -> None:
    with pytest.raises(ValueError, match="quantum_s must be > 0"):
        EngineTurns(0)
