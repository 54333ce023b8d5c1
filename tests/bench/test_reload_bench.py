"""`nmt-bench reload`: a short real run on a tiny bundle (nmt-serve --model-repository in a subprocess), and the
arithmetic that decides whether an answer came from exactly one complete version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench.reload import Call, Load, ReloadBenchConfig, Versions, markdown, tally, targets


@pytest.mark.slow
def test_reload_bench_runs_and_writes_its_report(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        "reload",
        "--bundle",
        str(tiny_bundle),
        "--data-dir",
        str(data_dir),
        "--sentences",
        "16",
        "--clients",
        "4",
        "--reloads",
        "2",
        "--duration",
        "6",
        "--beam",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["reload.json", "reload.md"]
    r = json.loads((out / "reload.json").read_text())
    assert r["failed"] == 0 and r["codes"] == {"OK": r["requests"]}
    assert all(v["requests"] > 0 and v["failed"] == 0 for v in r["by_interface"].values())
    assert [(ld["version"], ld["code"]) for ld in r["loads"]] == [(2, "OK"), (3, "OK")]
    assert all(ld["load_s"] > 0 for ld in r["loads"])
    assert len(r["kserve_answers_by_version"]) >= 2 and set(r["kserve_answers_by_version"]) <= {"1", "2", "3"}
    assert r["answers_not_from_one_version"] == 0 and r["wrong_text"] == 0
    assert r["nmt_answers_matching_reference"] == r["by_interface"]["nmt"]["requests"]
    assert r["latency"]["requests"] == r["ok"] == r["requests"] and r["latency"]["p50_ms"] <= r["latency"]["p99_ms"]
    u = r["unload_then_load"]
    assert u["ok"] and u["request_after_unload"] == "NOT_FOUND" and u["version_after_load"] == "3"
    assert [g["pass"] for g in r["targets"]] == [True, True]
    assert "| 0 failed requests | 0 of" in (out / "reload.md").read_text()
    assert cli.main(argv) == 1  # the report is there: not overwritten without --force


def call(interface: str, text: str, version: int = 0, floor: int = 1, ceiling: int = 1, code: str = "OK") -> Call:
    return Call(interface, 0, 0.0, 1.0, code, text, version, floor, ceiling)


def test_an_answer_counts_only_from_one_complete_version() -> None:
    loads = [Load(2, 0.5, 1.5), Load(3, 2.0, 3.0), Load(4, 3.5, 9.0, "UNAVAILABLE")]
    versions = Versions(returned=3, started=4, loads=loads)
    calls = [
        call("kserve", "ein Hund", 1),
        call("kserve", "ein Hund", 2, 1, 2),
        call("nmt", "ein Hund"),
        call("kserve", "ein Hund", 1, floor=2, ceiling=3),  # older than the version served when it was sent
        call("kserve", "ein Hund", 3, floor=1, ceiling=2),  # newer than any version loading when it came back
        call("kserve", "ein Hund", 4, 3, 4),  # a version whose load failed
        call("nmt", "eine Katze"),  # no version translates it so
        call("nmt", "", code="UNAVAILABLE"),
    ]
    t = tally(calls, versions, ["ein Hund"], ReloadBenchConfig(duration=1.0))
    assert (t["requests"], t["ok"], t["failed"], t["codes"]) == (8, 7, 1, {"OK": 7, "UNAVAILABLE": 1})
    assert t["kserve_answers_by_version"] == {"1": 2, "2": 1, "3": 1, "4": 1}
    assert (t["wrong_text"], t["version_outside_window"], t["answers_not_from_one_version"]) == (1, 3, 4)
    assert t["nmt_answers_matching_reference"] == 1 and t["failed_loads"] == 1
    assert [ld["requests"] for ld in t["loads"]] == [7, 0, 0]  # every call finished at 1.0 s: only in the first window
    assert [g["pass"] for g in targets(t)] == [False, False]


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["reload", "--clients", "1"])
    assert "clients must be >= 2" in capsys.readouterr().err
    assert cli.main(["reload", "--bundle", "/nonexistent"]) == 1
    assert "no bundle at /nonexistent" in capsys.readouterr().err


def test_markdown_names_the_targets() -> None:
    t = tally([call("kserve", "a", 1)], Versions(loads=[Load(2, 0.0, 0.5)]), ["a"], ReloadBenchConfig(duration=1.0))
    results = {
        "config": {"bundle": "b", "clients": 2, "reloads": 1, "duration": 1.0, "beam_size": 1, "split": "s"},
        "machine": {"cpu": "X, 2 cores; flags: avx2", "cpus": 2, "load_average_at_end": (1.0, 1.0, 1.0)},
        "sentences": 1,
        **t,
        "server_rss_mb": 1.0,
        "server_peak_rss_mb": 2.0,
        "targets": targets(t),
        "unload_then_load": {
            "unload_s": 0.0,
            "index_after_unload": [],
            "request_after_unload": "NOT_FOUND",
            "load_s": 0.1,
            "version_after_load": "2",
            "index_after_load": [],
            "ok": True,
        },
    }
    text = markdown(results)
    assert "| 0 failed requests | 0 of 1 | PASS |" in text
    assert "| 2 | 0.0 | 0.50 | OK | 1 |" in text
