"""Engine turns (engine/turns.py): who runs the next step, on how many threads. Real threads; a test clock
decides what has waited a quantum; each test waits on the turns' own state (a step queued) or an event, never on time.
With one core the steps run one at a time; with two, the budget shows."""

from __future__ import annotations

import threading

import pytest

from nmt.engine.turns import EngineTurns

QUANTUM = 0.05


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def turns(clock: Clock) -> EngineTurns:
    return EngineTurns(1, QUANTUM, clock)


def queue_step(
    turns: EngineTurns, name: str, rows: int, order: list[str], want: int = 1, shrinks: bool = True
) -> threading.Thread:
    """Another model's single step of `rows` rows, started and seen waiting for threads."""
    waiting = turns.waiting

    def run() -> None:
        with turns.step(rows, want, shrinks) as threads:
            order.append(name if want == 1 else f"{name} on {threads}")

    thread = threading.Thread(target=run, name=name)
    thread.start()
    assert turns.wait_for_waiting(waiting + 1, timeout=30), f"{name} never waited for the turn"
    return thread


def test_a_step_alone_runs_at_once_and_gives_the_turn_back(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.step(8, 1):
        order.append("first")
    with turns.step(8, 1):  # the turn was given back: no wait
        order.append("second")
    assert order == ["first", "second"] and turns.waiting == 0


def test_a_search_keeps_the_turn_between_its_steps(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(100, 1):
            order.append("search 1")
        other = queue_step(turns, "other", 100, order)  # as large: waits for the search or a quantum
        with turns.step(100, 1):
            order.append("search 2")
    other.join(timeout=30)
    assert order == ["search 1", "search 2", "other"]


def test_a_clearly_smaller_step_passes_a_large_search(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(128, 1):
            order.append("batch 1")
        small = queue_step(turns, "request", 4, order)
        with turns.step(128, 1):  # gives the turn to the small step first
            order.append("batch 2")
    small.join(timeout=30)
    assert order == ["batch 1", "request", "batch 2"]


def test_a_step_waiting_a_quantum_gets_the_next_turn(turns: EngineTurns, clock: Clock) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(4, 1):
            order.append("search 1")
        other = queue_step(turns, "large", 128, order)
        with turns.step(4, 1):  # the large step has not waited a quantum yet
            order.append("search 2")
        clock.now += QUANTUM * 1.01
        with turns.step(4, 1):
            order.append("search 3")
    other.join(timeout=30)
    assert order == ["search 1", "search 2", "large", "search 3"]


def test_a_freed_turn_goes_to_the_smallest_waiting_step(turns: EngineTurns) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(1, 1):
            order.append("holder")
        threads = [
            queue_step(turns, "rows 64", 64, order),
            queue_step(turns, "rows 8", 8, order),
            queue_step(turns, "rows 16", 16, order),
        ]
    for thread in threads:
        thread.join(timeout=30)
    assert order == ["holder", "rows 8", "rows 16", "rows 64"]


def test_steps_that_waited_a_quantum_go_first_oldest_first(turns: EngineTurns, clock: Clock) -> None:
    order: list[str] = []
    with turns.hold():
        with turns.step(1, 1):
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
    turns = EngineTurns(1, QUANTUM, clock, on_wait=waits.append)
    order: list[str] = []
    with turns.hold():
        with turns.step(4, 1):
            order.append("holder")
        other = queue_step(turns, "other", 4, order)
        clock.now += 0.02
    other.join(timeout=30)
    assert waits == [pytest.approx(0.02)]  # the holder's own steps never waited


def test_steps_of_one_thread_share_two_cores() -> None:
    turns = EngineTurns(2, QUANTUM, Clock())
    with turns.hold():
        with turns.step(8, 1) as threads:
            assert threads == 1
        order: list[str] = []
        other = queue_step_or_run(turns, "other", 4, order)
        other.join(timeout=30)  # ran beside the held thread: no wait
    assert order == ["other"] and turns.free == 2


def queue_step_or_run(turns: EngineTurns, name: str, rows: int, order: list[str]) -> threading.Thread:
    def run() -> None:
        with turns.step(rows, 1):
            order.append(name)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def test_a_large_step_shrinks_to_one_thread_while_a_small_one_runs() -> None:
    turns = EngineTurns(2, QUANTUM, Clock())
    got: list[int] = []
    inside, leave = threading.Event(), threading.Event()

    def small() -> None:
        with turns.hold():
            with turns.step(4, 1):
                inside.set()
                leave.wait(timeout=30)
            with turns.step(4, 1):
                pass

    with turns.hold():
        with turns.step(128, 2) as threads:
            got.append(threads)
        thread = threading.Thread(target=small)
        thread.start()
        assert turns.wait_for_waiting(1, timeout=30), "the small step never waited (both cores are taken)"
        with turns.step(128, 2) as threads:  # gives its threads back, then runs on the one left
            got.append(threads)
            assert inside.wait(timeout=30), "the small step never ran beside it"
        leave.set()
        thread.join(timeout=30)
        with turns.step(128, 2) as threads:  # the small search is over: both cores again
            got.append(threads)
    assert got == [2, 1, 2] and turns.free == 2


def test_a_step_that_cannot_shrink_waits_for_all_its_threads() -> None:
    turns = EngineTurns(2, QUANTUM, Clock())
    order: list[str] = []
    with turns.hold():
        with turns.step(4, 1):
            order.append("small")
        large = queue_step(turns, "large", 128, order, want=2, shrinks=False)
        with turns.step(4, 1):
            order.append("small again")
    large.join(timeout=30)
    assert order == ["small", "small again", "large on 2"]


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="quantum_s must be > 0"):
        EngineTurns(1, 0)


def test_a_holder_makes_room_for_a_step_that_cannot_shrink_once_it_waited_a_quantum() -> None:
    clock = Clock()
    turns = EngineTurns(2, QUANTUM, clock)
    order: list[str] = []
    with turns.hold():
        with turns.step(4, 1):
            order.append("small")
        large = queue_step(turns, "large", 128, order, want=2, shrinks=False)  # one core free: not enough
        clock.now += QUANTUM * 1.01
        with turns.step(4, 1):  # gives its core back, waits for the large step
            order.append("small again")
    large.join(timeout=30)
    assert order == ["small", "large on 2", "small again"]
