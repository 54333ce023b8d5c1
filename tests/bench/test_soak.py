"""`nmt-bench soak`: a few seconds of a real run on a tiny bundle, and the growth arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench.soak import SoakConfig, growth, markdown


@pytest.mark.slow
def test_soak_runs_and_writes_its_report(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = cli.main(
        [
            "soak",
            "--bundle",
            str(tiny_bundle),
            "--data-dir",
            str(data_dir),
            "--minutes",
            "0.1",
            "--rate",
            "20",
            "--bad-fraction",
            "0.2",
            "--beam",
            "1",
            "--sample-seconds",
            "1",
            "--warmup-minutes",
            "0.02",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["soak.json", "soak.md"]
    results = json.loads((out / "soak.json").read_text())
    assert len(results["samples"]) >= 5 and all(s["rss_mb"] > 0 for s in results["samples"])
    assert set(results["client_codes"]) == {"OK", "INVALID_ARGUMENT"}  # bad requests, and nothing else failed
    assert results["server_codes"] == {k: float(v) for k, v in results["client_codes"].items()}
    assert results["growth"]["from_s"] > 1.2 and results["skipped"] == 0
    assert "| RSS growth |" in (out / "soak.md").read_text()


def test_growth_after_the_warmup() -> None:
    cfg = SoakConfig(minutes=1, warmup_minutes=0.25)
    samples = [
        {
            "t_s": t,
            "rss_mb": 100.0 + (t / 3600 if t > 15 else 50),
            "peak_rss_mb": 160.0,
            "p99_ms": float(t),
            "p50_ms": 1.0,
            "ok_per_s": 1.0,
            "codes": {"OK": 1},
            "skipped": 0,
        }
        for t in range(10, 70, 10)
    ]
    g = growth(samples, cfg)
    assert (g["from_s"], g["to_s"], g["rss_growth_mb"]) == (20, 60, 0.0)  # the warm-up's jump is left out
    assert g["rss_slope_mb_per_hour"] == pytest.approx(1.0) and (g["p99_first_ms"], g["p99_last_ms"]) == (20.0, 60.0)
    results = {
        "config": {"minutes": 1, "rate": 5, "beam_size": 4, "bad_fraction": 0.1, "bundle": "b"},
        "machine": {"cpus": 2},
        "samples": samples,
        "growth": g,
        "client_codes": {"OK": 6},
        "server_codes": {"OK": 6.0},
        "skipped": 0,
    }
    text = markdown(results)
    assert "| RSS slope (least squares) | +1.00 MB/hour |" in text and "| 60 | 100.0 | 1.00 | 1.0 | 60.0 |" in text


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["soak", "--minutes", "1", "--warmup-minutes", "2"])
    assert "warmup_minutes in 0..minutes" in capsys.readouterr().err
    assert cli.main(["soak", "--bundle", "/nonexistent"]) == 1
