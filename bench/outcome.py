"""How the server benches end (load, soak, reload, fairness): one error line, or the report and a PASS/FAIL
line per target; the exit status says which."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import grpc

Results = dict[str, Any]


def finish(name: str, run: Callable[[], Results], report: Callable[[Results], str],
           targets: Callable[[Results], list[dict[str, Any]]] = lambda results: []) -> int:
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
