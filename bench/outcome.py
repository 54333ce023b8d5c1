"""How the server benches end (load, soak, reload, fairness): one error line, or the report and a PASS/FAIL
line per target; the exit status says which."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

Results = dict[str, Any]


def finish(
    name: str,
    run: Callable[[], Results],
    report: Callable[[Results], str],
    targets: Callable[[Results], list[dict[str, Any]]] = lambda results: [],
) -> int:
    """Run the bench; exit status 1 with `nmt-bench NAME: error: ...` when it cannot run, or when a target
    fails (each {target, value, pass} printed after the report), else 0."""
    try:
        results = run()
    except (ValueError, RuntimeError, OSError, grpc.RpcError) as e:
        print(f"nmt-bench {name}: error: {e}", file=sys.stderr)
        return 1
    print(report(results))
    found = targets(results)
    for goal in found:
        print(f"{'PASS' if goal['pass'] else 'FAIL'}: {goal['target']}: {goal['value']}")
    return 0 if all(goal["pass"] for goal in found) else 1


def write_report(out: Path, name: str, results: Results, markdown: Callable[[Results], str]) -> str:
    """OUT/NAME.json (the results) and OUT/NAME.md (their tables); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / f"{name}.md").write_text(text)
    return text
