"""Texts a hostile client sends to the text pipeline, and what they cost it per byte (issue 23, part 1).

Each shape repeats a unit up to a size in UTF-8 bytes: one long word, runs of digits, dots, slashes,
`@` and `:`, a thousand URLs, nested brackets, combining marks, mixed scripts, and the shapes that
once cost quadratic time (16 KB of "a1" took 1.5 s in the span patterns, "a The man " in the run-on
rule, "1 " in the placeholder loop). `cost_per_byte` times every stage before the model on one shape
at several sizes: CPU seconds, the least of a few rounds, with small sizes repeated so that every size
handles the same number of bytes per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SHAPES: dict[str, str] = {
    "one long word": "a",
    "letters and digits": "a1",
    "word then digit": "abcdefg1",
    "digits": "1",
    "spaced numbers": "1 ",
    "dots": ".",
    "digit dot": "1.",
    "slashes": "/",
    "word slash": "a/",
    "at signs": "@",
    "handles": "@a ",
    "word at": "a@",
    "colons": ":",
    "backslashes": "\\n",
    "windows paths": "C:\\a",
    "www runs": "awww",
    "urls": "https://example.org/photos?id=1 ",
    "nested brackets": "([{",
    "combining marks": "e\u0301",
    "mixed scripts": "a\u0430\u4e00",
    "mixed scripts spaced": "a \u0430 \u4e00 ",
    "emoji": "\U0001f600",
    "run-on captions": "a The man ",
    "ALL CAPS words": "A ",
    "Title Case words": "Big ",
}
SIZES = (1024, 4096, 16384)


def make(shape: str, size: int) -> str:
    """SHAPES[shape] repeated to at most `size` UTF-8 bytes."""
    unit = SHAPES[shape]
    text = unit * (size // len(unit.encode()) + 1)
    while len(text.encode()) > size:
        text = text[:-1]
    return text


@dataclass(frozen=True)
class Cost:
    shape: str
    size: int
    seconds: float  # CPU seconds for one text of `size` bytes
    per_byte_ns: float


def cost_per_byte(
    stage: Callable[[str], object], shape: str, sizes: tuple[int, ...] = SIZES, rounds: int = 5
) -> list[Cost]:
    """CPU time of `stage` on one text of each size (the least of `rounds`)."""
    largest = max(sizes)
    costs = []
    for size in sizes:
        text, copies = make(shape, size), max(1, largest // size)
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(copies):
                stage(text)
            best = min(best, (time.process_time() - started) / copies)
        costs.append(Cost(shape, size, best, best / len(text.encode()) * 1e9))
    return costs


def flatness(costs: list[Cost]) -> float:
    """The largest ratio of CPU time per byte between any two sizes (1.0: perfectly linear)."""
    per_byte = [max(c.per_byte_ns, 1e-3) for c in costs]
    return max(per_byte) / min(per_byte)


def measure(stage: Callable[[str], object], sizes: tuple[int, ...] = SIZES, rounds: int = 5) -> dict[str, Any]:
    """Every shape at every size: CPU ms, ns per byte, growth (per byte at the largest size over the
    smallest) and flatness (largest over smallest per byte), and the worst of each."""
    rows = []
    for shape in SHAPES:
        costs = cost_per_byte(stage, shape, sizes, rounds)
        rows.append(
            {
                "shape": shape,
                "ms": [round(c.seconds * 1e3, 3) for c in costs],
                "ns_per_byte": [round(c.per_byte_ns, 1) for c in costs],
                "growth": round(costs[-1].per_byte_ns / max(costs[0].per_byte_ns, 1e-3), 3),
                "flatness": round(flatness(costs), 3),
            }
        )
    return {
        "sizes": list(sizes),
        "rounds": rounds,
        "shapes": rows,
        "worst_ms_at_largest": max(r["ms"][-1] for r in rows),
        "worst_growth": max(r["growth"] for r in rows),
        "worst_flatness": max(r["flatness"] for r in rows),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    sizes = result["sizes"]
    head = " | ".join(f"{s // 1024} KB ms" for s in sizes)
    lines = [
        "| shape | " + head + " | ns/byte at " + f"{sizes[-1] // 1024} KB | growth | flatness |",
        "|---|" + "---:|" * (len(sizes) + 3),
    ]
    for row in result["shapes"]:
        lines.append(
            f"| {row['shape']} | "
            + " | ".join(f"{ms:.2f}" for ms in row["ms"])
            + f" | {row['ns_per_byte'][-1]:.0f} | {row['growth']:.2f} | {row['flatness']:.2f} |"
        )
    lines += [
        "",
        f"Worst: {result['worst_ms_at_largest']:.1f} ms for one {sizes[-1] // 1024} KB text "
        f"(goal: at most 20), growth {result['worst_growth']:.2f}, flatness {result['worst_flatness']:.2f} "
        "(goal: within 2). Growth: CPU time per byte at the largest size over the smallest; flatness: the "
        "largest over the smallest per byte across sizes (small texts carry a fixed cost per call).",
    ]
    return lines
