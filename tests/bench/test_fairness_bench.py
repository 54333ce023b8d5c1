"""`nmt-bench fairness`: a short real run on the tiny bundle (two models in one nmt-serve --model-repository
subprocess); the report's structure only, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench.fairness import FairnessBenchConfig, tally


@pytest.mark.slow
def test_fairness_bench_runs_and_writes_its_report(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        "fairness",
        "--bundle",
        str(tiny_bundle),
        "--data-dir",
        str(data_dir),
        "--sentences",
        "8",
        "--clients",
        "2",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--beam",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--engine-turns",
        "exclusive,off",
    ]
    code = cli.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["fairness.json", "fairness.md"]
    r = json.loads((out / "fairness.json").read_text())
    assert code == (0 if r["target"]["pass"] else 1)
    assert [(p["round"], p["turns"], p["phase"], p["load_clients"]) for p in r["phases"]] == [
        (1, "exclusive", "alone", 0),
        (1, "exclusive", "loaded", 2),
        (1, "off", "alone", 0),
        (1, "off", "loaded", 2),
    ]
    assert set(r["by_engine_turns"]) == {"exclusive", "off"}
    assert r["p99_ratio"] == r["by_engine_turns"]["exclusive"]["p99_ratio"]
    assert r["errors"] == 0 and r["probe_alone"]["requests"] > 0 and r["probe_loaded"]["requests"] > 0
    assert [p["load_requests"] > 0 for p in r["phases"]] == [False, True, False, True]
    assert r["p99_ratio"] > 0 and set(r["batches_by_model"]) == {"a", "b"}  # each model's own batches
    assert all(r["memory_mb"][k] > 0 for k in ("one_model_idle", "two_models_idle", "after_unloading_b"))
    assert r["machine"]["cpu"]
    text = (out / "fairness.md").read_text()
    assert "per loaded model" in text and "| alone |" in text
    assert cli.main(argv) == 1  # the report is there: not overwritten without --force


def test_tally_pools_the_rounds_and_compares_p99() -> None:
    cfg = FairnessBenchConfig(clients=4, duration=2.0)
    phases = [
        {
            "round": r,
            "phase": name,
            "load_clients": 4 if name == "loaded" else 0,
            "probe_latencies": [0.01] * 50 if name == "alone" else [0.03] * 50,
            "probe_errors": 0,
            "load_requests": 10 if name == "loaded" else 0,
            "load_errors": 0,
        }
        for r in (1, 2)
        for name in ("alone", "loaded")
    ]
    t = tally(phases, cfg)
    assert t["probe_alone"]["requests"] == t["probe_loaded"]["requests"] == 100
    assert t["p99_ratio"] == pytest.approx(3.0) and t["target"]["pass"] is False
    assert t["load_requests_per_s"] == pytest.approx(20 / 4.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        FairnessBenchConfig(rounds=0)
    with pytest.raises(ValueError, match="engine_turns must be distinct values of off, shared, exclusive"):
        FairnessBenchConfig(engine_turns=("off", "off"))
