"""`nmt-bench load`: a short real run on a tiny bundle (two nmt-serve subprocesses), and the goal arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nmt.bench import cli
from nmt.bench.load import LoadBenchConfig, ServerProcess
from nmt.bench.load_report import goals, markdown
from nmt.server.client import TranslationClient


@pytest.mark.slow
def test_load_bench_runs_and_writes_its_report(tiny_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = cli.main(
        [
            "load",
            "--bundle",
            str(tiny_bundle),
            "--data-dir",
            str(data_dir),
            "--sentences",
            "20",
            "--clients",
            "1,3",
            "--beam",
            "1",
            "--warmup",
            "0.3",
            "--duration",
            "1.5",
            "--engine-seconds",
            "0.3",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["load.json", "load.md", "load.png"]
    results = json.loads((out / "load.json").read_text())
    assert [(lv["setting"], lv["clients"]) for lv in results["levels"]] == [
        (setting, clients) for clients in (1, 3) for setting in ("continuous", "static", "unbatched")
    ]
    for level in results["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0, level
        assert level["p50_ms"] <= level["p99_ms"]
        assert 0 < level["peak_rss_mb"] < 2000
    assert all(lv["mean_batch"] == 1.0 for lv in results["levels"] if lv["setting"] == "unbatched")
    assert [e["clients"] for e in results["engine"]] == [1, 3]
    assert {g["goal"].split(" ")[0] for g in results["goals"]} == {"continuous", "static", "gRPC", "server"}


def test_server_process_serves_on_the_ports_it_bound_itself(server_bundle: Path) -> None:
    """No port is picked before nmt-serve binds it: it binds port 0 twice and names the ports in its port file."""
    server = ServerProcess(LoadBenchConfig(bundle=server_bundle, beam_size=1, threads=1), ["--batching", "static"])
    try:
        server.wait_serving()
        assert 0 not in (server.port, server.metrics_port) and server.port != server.metrics_port
        with TranslationClient(target=server.target) as client:
            assert client.health(timeout=10) == "SERVING"
        assert server.batch_histogram() == (0.0, 0.0)  # /metrics answers on the other port
    finally:
        code = server.close()
    assert code == 0 and not server.workdir.exists()


def test_missing_bundle_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["load", "--bundle", str(tmp_path / "none")]) == 1
    assert "no bundle at" in capsys.readouterr().err


def _level(setting: str, clients: int, speed: float, p99: float, batch: float) -> dict:
    return {
        "setting": setting,
        "clients": clients,
        "sentences_per_s": speed,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "mean_batch": batch,
        "requests": 10,
        "errors": 0,
        "rss_mb": 300.0,
        "peak_rss_mb": 350.0 + clients,
    }


def test_goals_compare_the_right_rows() -> None:
    results = {
        "config": {"bundle": "b", "beam_size": 4, "split": "s", "warmup": 1, "duration": 2, "threads": 0},
        "machine": {"cpus": 2, "platform": "p", "load_average_at_end": [1.0, 1.0, 1.0]},
        "sentences": 5,
        "levels": [
            _level("continuous", 1, 10.0, 104.0, 1.0),
            _level("static", 1, 10.0, 110.0, 1.0),
            _level("unbatched", 1, 11.0, 100.0, 1.0),
            _level("continuous", 16, 40.0, 600.0, 14.2),
            _level("static", 16, 30.0, 800.0, 9.0),
            _level("unbatched", 16, 10.0, 2000.0, 1.0),
            _level("continuous", 64, 60.0, 900.0, 31.6),
            _level("static", 64, 40.0, 1200.0, 30.0),
            _level("unbatched", 64, 10.0, 5000.0, 1.0),
        ],
        "engine": [
            {"clients": 1, "batch_size": 1, "sentences_per_s": 12.0, "p50_ms": 50.0, "p99_ms": 100.0},
            {"clients": 16, "batch_size": 14, "sentences_per_s": 50.0, "p50_ms": 300.0, "p99_ms": 400.0},
            {"clients": 64, "batch_size": 32, "sentences_per_s": 80.0, "p50_ms": 400.0, "p99_ms": 500.0},
        ],
    }
    found = {g["goal"]: g for g in goals(results)}
    assert [(g["value"], g["met"]) for g in found.values()] == [
        (pytest.approx(6.0), True),
        (pytest.approx(4.0), False),  # continuous, static / unbatched at 64
        (pytest.approx(52 / 50), True),
        (pytest.approx(1.04), True),  # continuous p50, p99 at 1 client / engine
        (pytest.approx(1.1), False),
        (pytest.approx(1.1), True),  # static p50, p99 at 1 client / engine
        (pytest.approx(0.75), True),
        (pytest.approx(4 / 3), True),  # continuous / static at 16: p99, speed
        (pytest.approx(0.75), False),
        (414.0, False),
    ]  # gRPC / engine at 64, peak RSS
    assert list(found)[2] == "continuous p50 latency at 1 client / engine p50 (batch 1)"
    assert list(found)[4] == "static p50 latency at 1 client / engine p50 (batch 1)"
    assert list(found)[6] == "continuous / static p99 latency at 16 clients"
    assert "| continuous | 64 | 60.00 | 450 | 900 | 31.60 | 80.00 (b=32) | 0.75 | 300 |" in markdown(results)


def test_extra_settings_are_opt_in_and_checked() -> None:
    """--also adds the traced-decoder servers (before/after in one run); unknown names are refused."""
    from nmt.bench.load import EXTRA_SETTINGS, LoadBenchConfig, parse_args

    assert parse_args(["--clients", "16"]).also == ()
    assert parse_args(["--also", "continuous-traced,static-traced"]).also == ("continuous-traced", "static-traced")
    assert EXTRA_SETTINGS["continuous-traced"][-2:] == ["--step-decoder", "off"]
    with pytest.raises(
        ValueError,
        match="^unknown setting 'nope'; choose from continuous-traced, static-traced, continuous-text-thread, static-text-thread$",
    ):
        LoadBenchConfig(also=("nope",))
